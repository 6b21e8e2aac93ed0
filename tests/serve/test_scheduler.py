"""The batching scheduler on its own: batches, the queue limit, cancellation and draining on close."""

from __future__ import annotations

import asyncio

import pytest

from aigc.config import SampleConfig
from aigc.generate import Request, generate
from aigc.models import load_run
from aigc.serve.scheduler import QueueFull, Scheduler, ShuttingDown


@pytest.fixture
def run(make_run):
    return load_run(make_run())


def rows(count: int, tokens: int = 4, seed: int = 0) -> list[Request]:
    config = SampleConfig(max_new_tokens=tokens, min_new_tokens=tokens, seed=seed)
    return [Request(prompt=f"review {i}", config=config) for i in range(count)]


async def drain(job) -> tuple[list, list]:
    events, done = [], None
    while done is None:
        kind, row, payload = await job.next()
        if kind == "event":
            events.append((row, payload))
        elif kind == "done":
            done = payload
        else:
            raise payload
    return done, events


def test_scheduler_batches_jobs_queued_while_a_batch_runs(run):
    async def main():
        scheduler = Scheduler(run.model, run.tokenizer, max_batch=8, max_queue=64)
        scheduler.start()
        first = scheduler.submit(rows(1, tokens=60), want_events=True)
        await first.next()  # the first batch is decoding now; these four wait for the next one
        waiting = [scheduler.submit(rows(2, seed=i), want_events=False) for i in range(4)]
        assert scheduler.queued == 8
        results = await asyncio.gather(drain(first), *(drain(job) for job in waiting))
        scheduler.close()
        return scheduler, results

    scheduler, results = asyncio.run(main())
    assert scheduler.batches == 2 and scheduler.largest_batch == 8
    for done, events in results[1:]:
        assert [c.index for c in done] == [0, 1] and events == []  # want_events=False: completions only
        assert all(len(c.token_ids) == 4 for c in done)


def test_scheduler_results_match_direct_generate(run):
    requests = rows(3, tokens=6, seed=9)

    async def main():
        scheduler = Scheduler(run.model, run.tokenizer, max_batch=4, max_queue=8)
        scheduler.start()
        done, events = await drain(scheduler.submit(requests, want_events=True))
        scheduler.close()
        return done, events

    done, events = asyncio.run(main())
    expected = generate(run.model, run.tokenizer, requests)
    assert [c.text for c in done] == [c.text for c in expected]
    for row in range(3):
        assert "".join(e.text for r, e in events if r == row) == done[row].text


def test_scheduler_rejects_beyond_queue_limit_and_after_close(run):
    async def main():
        scheduler = Scheduler(run.model, run.tokenizer, max_batch=4, max_queue=5)  # worker not started
        scheduler.submit(rows(3), want_events=False)
        with pytest.raises(QueueFull):
            scheduler.submit(rows(3), want_events=False)
        scheduler.submit(rows(2), want_events=False)
        with pytest.raises(ValueError):
            scheduler.submit(rows(5), want_events=False)  # more rows than a batch holds
        assert scheduler.close(timeout=1)
        with pytest.raises(ShuttingDown):
            scheduler.submit(rows(1), want_events=False)

    asyncio.run(main())


def test_scheduler_close_finishes_queued_jobs_and_skips_cancelled(run):
    async def main():
        scheduler = Scheduler(run.model, run.tokenizer, max_batch=2, max_queue=8)
        kept = [scheduler.submit(rows(2, seed=i), want_events=False) for i in range(2)]
        dropped = scheduler.submit(rows(1), want_events=False)
        dropped.cancel()
        scheduler.start()
        closing = asyncio.create_task(asyncio.to_thread(scheduler.close, 30))
        results = await asyncio.gather(*(drain(job) for job in kept))
        assert await closing
        return scheduler, results, dropped

    scheduler, results, dropped = asyncio.run(main())
    assert [len(done) for done, _ in results] == [2, 2]
    assert scheduler.batches == 2 and dropped.queue.empty()


def test_scheduler_stops_a_batch_whose_callers_all_left(run):
    async def main():
        scheduler = Scheduler(run.model, run.tokenizer, max_batch=2, max_queue=8)
        scheduler.start()
        job = scheduler.submit(rows(1, tokens=1000), want_events=True)
        await job.next()
        job.cancel()
        stopped = await asyncio.to_thread(scheduler.close, 30)
        return stopped, job

    stopped, job = asyncio.run(main())
    assert stopped
    kinds = []
    while not job.queue.empty():
        kinds.append(job.queue.get_nowait()[0])
    assert "done" not in kinds and len(kinds) < 999  # cut short, never completed


def test_scheduler_reports_decode_errors_to_every_job(run):
    bad = [Request(prompt="x", label="not-a-label")]

    async def main():
        scheduler = Scheduler(run.model, run.tokenizer, max_batch=4, max_queue=8)
        scheduler.start()
        job = scheduler.submit(bad, want_events=False)
        item = await job.next()
        ok = await drain(scheduler.submit(rows(1), want_events=False))  # the worker survived
        scheduler.close()
        return item, ok

    (kind, _, payload), (done, _) = asyncio.run(main())
    assert kind == "error" and "unknown label" in str(payload)
    assert len(done) == 1
