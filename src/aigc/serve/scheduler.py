"""The batching scheduler: one worker thread owns the model and decodes queued requests together.

HTTP handlers `submit` a job (one or more rows: prompts x n) and read its results from an asyncio
queue. The worker takes every queued job that fits in `max_batch` rows and runs them through one
`decode_stream` call; jobs that arrive while a batch runs wait for the next one. Each TokenEvent is
handed to its job as soon as it exists, so streaming clients see tokens while the batch is running.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from aigc.errors import AigcError
from aigc.generate import Completion, Request, decode_stream

log = logging.getLogger("aigc.serve")


class QueueFull(Exception):
    """More rows are waiting than `max_queue` allows."""


class ShuttingDown(Exception):
    """The scheduler is closing and takes no new work."""


# What a job's queue carries: ("event", row, TokenEvent) | ("done", None, [Completion]) | ("error", None, exc)
Item = tuple[str, int | None, Any]


@dataclass(eq=False)
class Job:
    """One HTTP request's rows and the asyncio queue its results arrive on."""

    requests: tuple[Request, ...]
    want_events: bool  # False: only the final completions are delivered (no per-token traffic)
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # the client left: stop delivering, and skip the job if still queued

    def push(self, item: Item) -> None:
        """Called from the worker thread; hands the item to the job's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed, so nobody can read this job any more
            self.cancelled = True

    async def next(self) -> Item:
        return await self.queue.get()

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    """Collects jobs and decodes them in batches of at most `max_batch` rows on one worker thread."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, max_batch: int, max_queue: int):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._pending_rows = 0
        self._running_rows = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        self.batches = 0  # batches decoded so far
        self.sequences = 0  # rows decoded so far (sequences / batches = mean batch size)
        self.largest_batch = 0  # most rows decoded together so far

    # -- called from the event loop --------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="aigc-decode", daemon=True)
        self._thread.start()

    def submit(self, requests: Sequence[Request], *, want_events: bool) -> Job:
        """Queue rows for decoding. Raises QueueFull or ShuttingDown; never blocks."""
        if not 1 <= len(requests) <= self.max_batch:
            raise ValueError(f"a job needs 1..{self.max_batch} rows, got {len(requests)}")
        job = Job(tuple(requests), want_events, asyncio.get_running_loop())
        with self._cond:
            if self._closed:
                raise ShuttingDown()
            if self._pending_rows + len(requests) > self.max_queue:
                raise QueueFull()
            self._pending.append(job)
            self._pending_rows += len(requests)
            self._cond.notify()
        return job

    def close(self, timeout: float | None = None) -> bool:
        """Take no new jobs, finish the queued and running ones, stop the worker. True once stopped."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    @property
    def queued(self) -> int:
        return self._pending_rows

    @property
    def running(self) -> int:
        return self._running_rows

    @property
    def closed(self) -> bool:
        return self._closed

    # -- the worker thread -----------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running (False before start and after close)."""
        return self._thread is not None and self._thread.is_alive()

    def _work(self) -> None:
        # Runs until close() has been called and the queue is empty, and only then: a batch whose
        # every job was cancelled while queued is no reason to stop (that once wedged the server).
        while (batch := self._take_batch()) is not None:
            if batch:
                self._run_batch(batch)

    def _take_batch(self) -> list[Job] | None:
        """Wait for work; the queued jobs that fit in one batch ([] if all were cancelled), or None
        once closed and drained."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if not self._pending:
                return None
            batch, rows = [], 0
            while self._pending and rows + len(self._pending[0].requests) <= self.max_batch:
                job = self._pending.popleft()
                self._pending_rows -= len(job.requests)
                if not job.cancelled:
                    batch.append(job)
                    rows += len(job.requests)
            self._running_rows = rows
            return batch

    def _run_batch(self, batch: list[Job]) -> None:
        """Decode one batch and answer its jobs; any failure is answered to this batch's jobs only."""
        owners = [(job, row) for job in batch for row in range(len(job.requests))]
        self.batches += 1
        self.sequences += len(owners)
        self.largest_batch = max(self.largest_batch, len(owners))
        try:
            completions = self._decode([r for job in batch for r in job.requests], owners, batch)
        except Exception as exc:  # one failed batch must not kill the worker
            if not isinstance(exc, AigcError):
                log.error("decoding a batch of %d sequences failed", len(owners), exc_info=exc)
            completions = exc
        finally:
            with self._cond:
                self._running_rows = 0  # before answering, so no caller sees its own rows still running
        if isinstance(completions, Exception):
            for job in batch:
                job.push(("error", None, completions))
            return
        if completions is None:
            return
        per_job: dict[Job, list[Completion]] = {job: [] for job in batch}
        for completion in completions:
            job, row = owners[completion.index]
            per_job[job].append(replace(completion, index=row))
        for job, done in per_job.items():
            job.push(("done", None, done))

    def _decode(self, rows: list[Request], owners: list[tuple[Job, int]], batch: list[Job]) -> list[Completion] | None:
        """Drive the shared decode loop, routing each token to its job. None if every caller left."""
        stream = decode_stream(self.model, self.tokenizer, rows)
        with torch.inference_mode():
            for event in stream:
                job, row = owners[event.index]
                if job.want_events and not job.cancelled:
                    job.push(("event", row, event))
                if job.cancelled and all(j.cancelled for j in batch):
                    stream.close()
                    return None
        return stream.completions
