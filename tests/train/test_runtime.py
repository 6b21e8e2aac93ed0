import os
import threading
import time

from aigc.train.runtime import auto_threads, busy_cores


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_busy_cores_sees_a_spinning_thread_at_once():
    """A busy core shows up immediately, not after the load average catches up a minute later."""
    cores = os.cpu_count() or 1
    spinner = threading.Thread(target=_spin, args=(1.0,))
    spinner.start()
    try:
        busy = busy_cores(interval_s=0.5)
    finally:
        spinner.join()
    assert 0.5 <= busy <= cores
    assert 1 <= auto_threads() <= cores
