"""The training loop: one `train()` call pretrains, resumes or fine-tunes a run.

Per optimizer step: `grad_accum` micro-batches (forward under autocast, backward), gradient clipping,
the scheduled learning rate, fused AdamW. Every `eval_every` steps: validation metrics, a checkpoint
and one line of `metrics.jsonl`. Progress goes to the caller through `on_event`; nothing is printed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from aigc.artifacts.hardware import hardware
from aigc.artifacts.run import (
    BEST,
    STATE,
    TOKENIZER,
    WEIGHTS,
    RunConfig,
    Weights,
    save_config,
    save_weights,
)
from aigc.artifacts.state import load_state, save_state
from aigc.config import ModelConfig, TrainConfig
from aigc.errors import AigcError
from aigc.fsutil import file_digest, remove_stale_temp_files
from aigc.models import adapted, lora
from aigc.models.kinds import describe
from aigc.plots import plot_runs
from aigc.train import runtime as rt
from aigc.train import setup
from aigc.train.batches import BatchSampler, eval_batches, fixed_windows
from aigc.train.build import build_training_model
from aigc.train.events import EventCallback, TrainEnd, TrainEval, TrainingInterrupted, TrainStart, TrainStep
from aigc.train.metrics import MetricsLog, check_tensorboard
from aigc.train.optim import build_optimizer, learning_rate, set_learning_rate

STATE_FORMAT = 1  # bumped when state.pt's layout changes; an older state is refused, not misread
# Training accuracy needs an argmax over (B, T, V) logits; it is sampled on one step in this many.
TRAIN_ACC_EVERY = 10


def train(
    data_dir: str | Path | None,
    out_dir: str | Path,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    *,
    preset: str = "small",
    resume: bool = False,
    init_from: str | Path | None = None,
    overwrite: bool = False,
    on_event: EventCallback | None = None,
) -> Path:
    """Train a model on a prepared dataset and write the run folder `out_dir`; returns its path.

    model_config: the model shape; None means the `preset` (new runs), the saved one (`resume`) or
    the one of `init_from`. The vocabulary size always comes from the dataset's tokenizer.
    train_config: None means defaults (new runs) or the saved config (`resume`).
    resume: continue `out_dir` exactly where its last checkpoint left off; `data_dir` may be None.
    init_from: fine-tune: start from that run's weights (the data must use its tokenizer).
    Raises AigcError for bad input, TrainingInterrupted after Ctrl-C (a checkpoint is saved first).
    """
    plan = setup.plan_session(
        data_dir, out_dir, model_config, train_config, preset=preset, resume=resume, init_from=init_from
    )
    config = plan.train_config
    if not (config.max_steps or config.max_tokens or config.minutes):
        raise AigcError("no training budget; give --max-steps, --max-tokens or --minutes")
    check_tensorboard(config.tensorboard)
    runtime = rt.start(config.device, config.dtype, config.threads)
    try:
        setup.check_world_size(plan, runtime.world_size)
        with rt.rank_zero_first(runtime):
            if runtime.is_main:
                setup.check_run_dir(plan.run_dir, resume=plan.resume, overwrite=overwrite)
        trainer = Trainer(plan, runtime, on_event if runtime.is_main else None, overwrite)
        return trainer.run()
    finally:
        rt.stop(runtime)


class Trainer:
    """One training session over a planned run; the state that `state.pt` saves lives here."""

    def __init__(self, plan: setup.SessionPlan, runtime: rt.Runtime, on_event: EventCallback | None, overwrite: bool):
        self.plan, self.runtime, self.cfg = plan, runtime, plan.train_config
        self.on_event = on_event
        self.run_dir = plan.run_dir
        torch.manual_seed(self.cfg.seed)
        built = build_training_model(plan, self.cfg)
        self.model = built.model.to(runtime.device).train()
        self.lora, self.base_ref, self.base_sha = built.lora, built.base_ref, built.base_sha
        if runtime.dtype == "bf16" and self.lora is not None:  # LoRA's frozen base (never saved) in bf16:
            lora.hold_frozen_in(self.model, torch.bfloat16)  # no per-step casts of it
        self.optimizer = build_optimizer(self.model, self.cfg, runtime.device)
        block = plan.seq_len
        self.sampler = BatchSampler(
            plan.data.train.tokens,
            block,
            self.cfg.batch_size,
            seed=self.cfg.seed,
            rank=runtime.rank,
            world_size=runtime.world_size,
            mask=plan.data.train.mask,  # instruction data: learn the assistant's tokens only
            starts=setup.window_starts(plan),
        )
        world_batch = self.cfg.batch_size * runtime.world_size
        self.tokens_per_step = world_batch * block * self.cfg.grad_accum
        val = plan.data.val  # instruction data: validate on the assistant's tokens too, as training learns them
        self.val_starts = fixed_windows(val.tokens, block, self.cfg.eval_batches * world_batch, val.mask)
        lengths = setup.token_byte_lengths(plan.data.tokenizer, plan.model_config.vocab_size)
        self.byte_lengths = torch.from_numpy(lengths).to(runtime.device)  # (V,)
        self.step, self.tokens, self.elapsed_before, self.best_val = 0, 0, 0.0, math.inf
        self.last_eval_step, self.last_metrics, self.last_lr = -1, None, 0.0
        self._reset_running()
        self.notes: list[str] = []
        if plan.resume:
            self._load_state(load_state(self.run_dir))
            if runtime.is_main:
                self._check_weights_file()
        with rt.rank_zero_first(runtime):
            if runtime.is_main:
                self._write_run_files(overwrite)
        self.log = MetricsLog(self.run_dir, self.cfg.tensorboard) if runtime.is_main else None
        self.wrapped, self.ddp = self._wrap(self.model)
        # On GPUs, reading the loss forces a host sync; do it every few steps only.
        self.sync_every = 1 if runtime.device.type == "cpu" else 10
        self.interrupt_requested = False

    # -- setup ------------------------------------------------------------------------------

    def _wrap(self, model: nn.Module) -> tuple[nn.Module, DistributedDataParallel | None]:
        ddp = None
        if self.runtime.world_size > 1:
            device_ids = [self.runtime.device.index] if self.runtime.device.type == "cuda" else None
            # The only buffers a model in training holds are a quantised base's blocks: frozen, and the
            # same on every rank (one hash-checked file). Re-broadcast before every forward pass (DDP's
            # default) they would send the whole base each step.
            model = ddp = DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
        if self.cfg.compile:
            model = torch.compile(model)
        return model, ddp

    def _write_run_files(self, overwrite: bool) -> None:
        weights = Weights()
        if self.lora is not None:
            weights = Weights("lora", lora=self.lora.to_json(), base=self.base_ref, base_sha256=self.base_sha)
        run_config = RunConfig(
            model=self.plan.model_config,
            train=self.cfg,
            data=self.plan.data.provenance(),
            init_from=self.plan.init_from,
            weights=weights,
            extra={
                "parameters": lora.parameter_counts(self.model),
                "hardware": hardware(self.runtime.device, self.runtime.dtype, self.runtime.world_size),
            },
        )
        run_config.extra["precision"] = {"dtype": self.runtime.dtype, "reason": self.runtime.dtype_reason}
        if self.plan.resume:
            self.log_truncate()
        elif overwrite:
            setup.clear_run_dir(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(self.run_dir)  # what a killed run left (.model.safetensors.*.tmp, .tmpXXXXXX)
        chat_template = setup.carry_chat_template(self.plan)  # a fine-tuned chat model still chats
        save_config(self.run_dir, dataclasses.replace(run_config, chat_template_source=chat_template))
        if not self.plan.resume:
            self.plan.data.tokenizer.save(self.run_dir / TOKENIZER)

    def log_truncate(self) -> None:
        """A resumed run continues the curve from its checkpoint: drop any later metrics lines."""
        MetricsLog.truncate(self.run_dir, self.step)

    # -- state ------------------------------------------------------------------------------

    def _reset_running(self) -> None:
        """Training loss/accuracy accumulate between evaluations (as tensors: no host sync per step)."""
        self.run_loss = torch.zeros((), device=self.runtime.device)
        self.run_acc = torch.zeros((), device=self.runtime.device)
        self.run_steps, self.run_acc_steps, self.run_tokens, self.run_time = 0, 0, 0, 0.0

    def _state(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "tokens": self.tokens,
            "elapsed_s": self._elapsed(),
            "best_val_loss": self.best_val,
            "last_eval_step": self.last_eval_step,
            "model": adapted.trainable_state(self.model) if self.lora else self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state(),
            "torch_rng": torch.get_rng_state(),
            "running": {
                "loss": self.run_loss.item(),
                "acc": self.run_acc.item(),
                "steps": self.run_steps,
                "acc_steps": self.run_acc_steps,
                "tokens": self.run_tokens,
                "time": self.run_time,
            },
        }

    def _load_state(self, state: dict) -> None:
        path = self.run_dir / STATE
        if state.get("format") != STATE_FORMAT:
            raise AigcError(
                f"{path} has state format {state.get('format')}, this aigc reads {STATE_FORMAT}; start again "
                "with --overwrite"
            )
        try:
            if self.lora:  # the frozen base is not in the state: it was loaded from the base run
                adapted.load_trainable_state(self.model, state["model"])
            else:
                self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.sampler.set_state(state["sampler"])
            torch.set_rng_state(state["torch_rng"])
            running = state["running"]
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise AigcError(
                f"{path} does not match this run ({type(exc).__name__}: {str(exc)[:120]}); start again with --overwrite"
            ) from exc
        self.step, self.tokens, self.elapsed_before = state["step"], state["tokens"], state["elapsed_s"]
        self.best_val, self.last_eval_step = state["best_val_loss"], state["last_eval_step"]
        self.run_loss.fill_(running["loss"])
        self.run_acc.fill_(running["acc"])
        self.run_steps, self.run_tokens, self.run_time = running["steps"], running["tokens"], running["time"]
        self.run_acc_steps = running.get("acc_steps", running["steps"])

    def _check_weights_file(self) -> None:
        """model.safetensors must hold the weights of state.pt; rewrite it from them (atomically) and
        say so when it does not: damaged, missing, or left from an earlier step by a crash between the
        two writes of a checkpoint."""
        path, fresh = self.run_dir / WEIGHTS, self.run_dir / f".{WEIGHTS}.from-state"
        self._save_weights(fresh.name)  # the same writer as a checkpoint (a LoRA run stores its adapters only)
        before = file_digest(path) if path.is_file() else None
        if before == file_digest(fresh):
            fresh.unlink()  # intact: leave the file (and its time stamp, which the demo's reuse reads) alone
            return
        os.replace(fresh, path)
        what = "was missing" if before is None else "did not match state.pt (damaged or from an earlier step)"
        self.notes.append(f"{path} {what}; rewritten from {STATE} (step {self.step})")

    def _save(self) -> None:
        """Checkpoint: state.pt first (it holds the weights too, so it is complete on its own), then
        model.safetensors for the readers of the run. Each write is atomic."""
        if self.runtime.is_main:
            save_state(self.run_dir, self._state())
            self._save_weights(WEIGHTS)

    def _save_weights(self, name: str) -> None:
        """All weights, or for a LoRA run the trained tensors only (config.json names the base)."""
        if self.lora is not None:
            adapted.save_trainable(self.model, self.run_dir / name)
        else:
            save_weights(self.model, self.run_dir / name)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> Path:
        self.t0 = time.perf_counter()
        self._emit(self._start_event())
        reason = self._done_reason()
        already_done = reason is not None
        try:
            with rt.sigint_calls(self._request_stop):  # first Ctrl-C: finish the step, save, stop
                while reason is None:
                    reason = self._one_step()
        finally:
            self.sampler.close()
        if not already_done and self.last_eval_step != self.step:
            self._evaluate()
        if self.runtime.is_main:
            plot_runs([self.run_dir])
        self._emit(TrainEnd(self.run_dir, self.step, "already done" if already_done else reason, self.last_metrics))
        return self.run_dir

    def _one_step(self) -> str | None:
        """Run one optimizer step and what is due after it; returns why training ends, or None."""
        started = time.perf_counter()
        loss, lr = self._train_step()
        eval_due = self.step % self.cfg.eval_every == 0
        save_due = bool(self.cfg.save_every) and self.step % self.cfg.save_every == 0
        if self.step % self.sync_every and not (eval_due or save_due) and self._done_reason(time_too=False) is None:
            self.run_time += time.perf_counter() - started
            return None
        loss_value = loss.item()  # waits for the step to finish, so the timing below is honest
        self.run_time += time.perf_counter() - started
        self._emit(
            TrainStep(self.step, self.tokens, loss_value, lr, self._throughput(), self._elapsed(), self._progress())
        )
        elapsed, interrupted, nonfinite = self._sync_status(loss_value)
        if nonfinite:
            raise self._nonfinite_error("training loss")
        reason = self._done_reason()
        if eval_due or reason is not None:
            self._evaluate()
        elif save_due:
            self._save()
        if interrupted:
            if self.last_eval_step != self.step:
                self._save()
            raise TrainingInterrupted(self.run_dir, self.step)
        return reason

    def _train_step(self) -> tuple[torch.Tensor, float]:
        """Accumulate gradients over `grad_accum` micro-batches and take one AdamW step."""
        cfg, device = self.cfg, self.runtime.device
        lr = learning_rate(self.step, self._progress(), cfg)
        set_learning_rate(self.optimizer, lr)
        self.last_lr = lr
        total = torch.zeros((), device=device)
        measure_acc = self.step % TRAIN_ACC_EVERY == 0
        for micro in range(cfg.grad_accum):
            inputs, targets = self.sampler.next(device)  # (B, T) each
            # DDP all-reduces gradients on the last micro-batch only.
            last = micro == cfg.grad_accum - 1
            sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
            with sync:
                with self.runtime.autocast():
                    # Logits (B, T, V) only when accuracy is sampled; otherwise the fused loss skips them.
                    logits, loss = self.wrapped(inputs, targets, return_logits=measure_acc)
                (loss / cfg.grad_accum).backward()
            total += loss.detach() / cfg.grad_accum
            if measure_acc:
                self.run_acc += (logits.detach().argmax(-1) == targets).float().mean() / cfg.grad_accum
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += self.tokens_per_step
        self.run_loss += total
        self.run_steps += 1
        self.run_acc_steps += measure_acc
        self.run_tokens += self.tokens_per_step
        return total, lr

    def _sync_status(self, loss_value: float) -> tuple[float, bool, bool]:
        """Agree across processes on elapsed time, Ctrl-C and a non-finite loss, so all stop together."""
        flags = [self._elapsed(), float(self.interrupt_requested), float(not math.isfinite(loss_value))]
        elapsed, interrupted, nonfinite = rt.all_max(flags, self.runtime)
        self.elapsed_synced = elapsed
        return elapsed, interrupted > 0, nonfinite > 0

    # -- evaluation -------------------------------------------------------------------------

    @torch.no_grad()
    def _validate(self) -> tuple[float, float, float]:
        """Mean loss, next-token accuracy and bits per byte over the fixed validation windows."""
        self.model.eval()
        block, val = self.plan.seq_len, self.plan.data.val
        mine = self.val_starts[self.runtime.rank :: self.runtime.world_size]
        loss_sum = correct = count = num_bytes = 0.0
        batches = eval_batches(val.tokens, mine, block, self.cfg.batch_size, self.runtime.device, val.mask)
        for inputs, targets in batches:
            with self.runtime.autocast():
                logits, loss = self.model(inputs, targets)
            counted = targets != -1  # (B, T); all True without a loss mask
            counted_tokens = counted.sum().item()
            loss_sum += loss.item() * counted_tokens  # the loss is the mean over counted targets
            correct += (logits.argmax(-1) == targets).sum().item()
            count += counted_tokens
            num_bytes += (self.byte_lengths[targets.clamp(min=0)] * counted).sum().item()
        self.model.train()
        loss_sum, correct, count, num_bytes = rt.all_sum([loss_sum, correct, count, num_bytes], self.runtime)
        return loss_sum / count, correct / count, loss_sum / math.log(2) / max(num_bytes, 1.0)

    def _evaluate(self) -> None:
        val_loss, val_acc, val_bpb = self._validate()
        loss_sum, acc_sum = rt.all_sum([self.run_loss.item(), self.run_acc.item()], self.runtime)
        train_loss = loss_sum / self.runtime.world_size / max(self.run_steps, 1)
        train_acc = acc_sum / self.runtime.world_size / max(self.run_acc_steps, 1)
        if not math.isfinite(val_loss) or not math.isfinite(train_loss):
            raise self._nonfinite_error("validation loss" if math.isfinite(train_loss) else "training loss")
        metrics = {
            "step": self.step,
            "tokens": self.tokens,
            "epoch": round(self.tokens / len(self.plan.data.train), 4),
            "elapsed_s": round(self._elapsed(), 2),
            "lr": self.last_lr,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 700.0)),
            "val_bpb": val_bpb,
            "val_acc": val_acc,
            "tokens_per_s": round(self.run_tokens / max(self.run_time, 1e-9), 1),
        }
        is_best = val_loss < self.best_val
        self.best_val = min(self.best_val, val_loss)
        self.last_eval_step, self.last_metrics = self.step, metrics
        self._reset_running()
        self._save()
        if self.runtime.is_main:
            if is_best:
                self._save_weights(BEST)
            self.log.append(metrics)
            self.model.eval()
            with torch.random.fork_rng(devices=[]):  # samples drawn by the callback must not shift our RNG
                self._emit(TrainEval(metrics, is_best, self.model, self.plan.data.tokenizer))
            self.model.train()

    def _nonfinite_error(self, what: str) -> AigcError:
        saved = (
            f"the last good checkpoint (step {self.last_eval_step}) is kept in {self.run_dir}"
            if self.last_eval_step > 0
            else "no checkpoint was saved"
        )
        lower = self.cfg.learning_rate / 3
        return AigcError(
            f"{what} became NaN/inf at step {self.step}; training stopped and {saved}; "
            f"lower the learning rate, e.g. --learning-rate {lower:.3g} (was {self.cfg.learning_rate:g})"
        )

    # -- budget and timing ------------------------------------------------------------------

    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def _progress(self) -> float:
        cfg, parts = self.cfg, [0.0]
        if cfg.max_steps:
            parts.append(self.step / cfg.max_steps)
        if cfg.max_tokens:
            parts.append(self.tokens / cfg.max_tokens)
        if cfg.minutes:
            parts.append(getattr(self, "elapsed_synced", self.elapsed_before) / (cfg.minutes * 60))
        return min(max(parts), 1.0)

    def _done_reason(self, time_too: bool = True) -> str | None:
        cfg = self.cfg
        if cfg.max_steps and self.step >= cfg.max_steps:
            return "max_steps"
        if cfg.max_tokens and self.tokens >= cfg.max_tokens:
            return "max_tokens"
        if time_too and cfg.minutes and getattr(self, "elapsed_synced", self.elapsed_before) >= cfg.minutes * 60:
            return "minutes"
        return None

    def _throughput(self) -> float:
        return self.run_tokens / self.run_time if self.run_time > 0 else 0.0

    # -- reporting --------------------------------------------------------------------------

    def _start_event(self) -> TrainStart:
        warning = rt.precision_warning(self.runtime)
        return TrainStart(
            run_dir=self.run_dir,
            step=self.step,
            model_config=self.plan.model_config,
            train_config=self.cfg,
            num_params=sum(p.numel() for p in self.model.parameters()),
            description=describe(self.model).line(),
            device=self.runtime.describe(),
            dtype=self.runtime.dtype,
            world_size=self.runtime.world_size,
            resumed=self.plan.resume,
            init_from=self.plan.init_from,
            notes=(*self.notes, *((warning,) if warning else ()), *self._precision_note()),
        )

    def _precision_note(self) -> tuple[str, ...]:
        if self.cfg.dtype != "auto":
            return ()
        return (f"--dtype auto chose {self.runtime.dtype}: {self.runtime.dtype_reason}",)

    def _emit(self, event) -> None:
        """Hand an event to the callback; a KeyboardInterrupt from it means 'stop after this step'."""
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except KeyboardInterrupt:
            self._request_stop()

    def _request_stop(self) -> None:
        self.interrupt_requested = True
