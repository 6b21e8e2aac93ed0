"""Where and how training runs: device, precision, threads, and data-parallel processes.

Device and precision are chosen by `aigc.artifacts.device` (shared with generate, eval and serve).

Distributed. `torchrun --nproc_per_node=N` sets RANK/WORLD_SIZE/LOCAL_RANK; we then join a process
group (gloo on CPU, NCCL on GPU) and wrap the model in DistributedDataParallel.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from aigc.artifacts import heap
from aigc.artifacts.device import cpu_has_fast_bf16, pick_device
from aigc.train.precision import choose_training_dtype


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: str  # "fp32" or "bf16": the autocast precision of matmuls
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # True when we created the process group (and must destroy it)
    threads_before: int = 0  # torch's CPU thread count before we changed it (restored by `stop`)
    dtype_reason: str = ""  # why `dtype` (e.g. the --dtype auto probe's figures)
    holds_heap: bool = False  # True when freed memory stays in the process until `stop` (artifacts.heap)

    def describe(self) -> str:
        """e.g. 'cpu (2 threads)' or 'cuda:0'."""
        if self.device.type == "cpu":
            return f"cpu ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})"
        return str(self.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def precision_warning(runtime: Runtime) -> str | None:
    """A line for the user when an explicit choice is known to be slow here."""
    if runtime.dtype == "bf16" and runtime.device.type == "cpu" and not cpu_has_fast_bf16():
        return "bf16 on a CPU without AMX/AVX512-BF16 is emulated and far slower than fp32; consider --dtype auto"
    return None


def auto_threads(processes: int = 1) -> int:
    """CPU threads per process: the cores that other work leaves free, split between our processes.

    On a shared machine this matters more than anything else: when the threads of one parallel
    region outnumber the free cores, each region waits for a descheduled thread (docs/benchmarks.md:
    under a load of 7 on 2 cores, 2 threads ran at 1/3 the speed of 1 thread)."""
    cores = os.cpu_count() or 1
    free = max(1, round(cores - busy_cores()))
    return max(1, min(cores, free) // processes)


def busy_cores(interval_s: float = 0.2) -> float:
    """How many cores other work keeps busy right now.

    Sampled from /proc/stat over a short interval rather than read from the load average: the
    load average trails by a minute, so a job that just finished (a test run, a previous step of
    `aigc demo`) would make us pick one thread on an idle machine, measured ~3x slower here."""
    first = _cpu_times()
    if first is None:
        try:
            return os.getloadavg()[0]
        except OSError:  # neither source exists on this platform: assume the machine is ours
            return 0.0
    time.sleep(interval_s)
    second = _cpu_times()
    total, idle = second[0] - first[0], second[1] - first[1]
    return (os.cpu_count() or 1) * (1 - idle / total) if total > 0 else 0.0


def _cpu_times() -> tuple[int, int] | None:
    """(total, idle) jiffies over all CPUs from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields[:8]), fields[3] + fields[4]  # user..steal; idle + iowait


def start(device: str, dtype: str, threads: int = 0) -> Runtime:
    """Pick device, precision and CPU threads; join the process group when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = pick_device(device, local_rank)
    owns_group = False
    if world_size > 1:
        if not dist.is_initialized():
            backend = "nccl" if torch_device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
            owns_group = True
    threads_before = torch.get_num_threads()
    if torch_device.type == "cpu":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
        torch.set_num_threads(threads or auto_threads(local_world))
    # After the threads are set: the --dtype auto probe times products with them.
    choice = choose_training_dtype(dtype, torch_device)
    holds_heap = torch_device.type == "cpu" and heap.hold()  # a step's big temporaries reuse memory
    return Runtime(torch_device, choice.dtype, rank, world_size, owns_group, threads_before, choice.reason, holds_heap)


def stop(runtime: Runtime) -> None:
    torch.set_num_threads(runtime.threads_before)
    if runtime.holds_heap:
        heap.release()
    if runtime.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _all_reduce(values: list[float], runtime: Runtime, op) -> list[float]:
    if runtime.world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def all_sum(values: list[float], runtime: Runtime) -> list[float]:
    """Sum numbers over all processes (identity in a single process)."""
    return _all_reduce(values, runtime, dist.ReduceOp.SUM)


def all_max(values: list[float], runtime: Runtime) -> list[float]:
    """Per position, the largest value over all processes (e.g. flags, so all processes stop together)."""
    return _all_reduce(values, runtime, dist.ReduceOp.MAX)


def barrier(runtime: Runtime) -> None:
    if runtime.world_size > 1:
        dist.barrier()


@contextlib.contextmanager
def rank_zero_first(runtime: Runtime) -> Iterator[None]:
    """Let rank 0 do (and validate) filesystem work before the other processes read it."""
    if not runtime.is_main:
        barrier(runtime)
    yield
    if runtime.is_main:
        barrier(runtime)


@contextlib.contextmanager
def sigint_calls(on_interrupt) -> Iterator[None]:
    """While active, the first Ctrl-C calls `on_interrupt()` instead of raising (so the caller can stop
    at a clean point); it also restores the previous handler, so a second Ctrl-C stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        on_interrupt()
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
