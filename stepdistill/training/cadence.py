"""The training loop's small tools: `every(n, fn)` hooks, the clock of training seconds, and stop requests (SIGINT
and SIGTERM stop the loop between iterations)."""
from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

from tqdm import tqdm


class Interrupted(KeyboardInterrupt):
    """Training stopped on SIGINT (Ctrl-C) or SIGTERM after saving a checkpoint; `signum` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stop_requests():
    """Within the block SIGINT and SIGTERM only set the returned list's first element to the signal, so the loop
    stops between iterations (weights and random state of the same iteration); a second SIGINT stops at once,
    without a checkpoint. Outside the main thread (where Python delivers no signals) nothing changes."""
    got = [0]
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def handler(signum, frame):
        if got[0] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        got[0] = signum
        tqdm.write(f"{signal.Signals(signum).name}: stopping after this iteration with a checkpoint (Ctrl-C again "
                   "stops at once, without one)")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class Clock:
    """Training seconds since `start()`; the time spent inside `excluded()` blocks is not counted."""

    def __init__(self) -> None:
        self.start()

    def start(self, elapsed: float = 0.0) -> None:
        """Count from `elapsed` seconds (a resumed run's, saved with its checkpoint)."""
        self.t0, self.paused = time.time() - elapsed, 0.0

    def __call__(self) -> float:
        return time.time() - self.t0 - self.paused

    @contextmanager
    def excluded(self):
        t0 = time.time()
        yield
        self.paused += time.time() - t0


def every(n: int, fn: Callable[[], object], also: tuple[int, ...] = ()) -> Callable[[int], None]:
    """A hook: after iteration `step`, call fn() when n divides step (n = 0: never) or step is one of `also`."""
    def hook(step: int) -> None:
        if (n and step % n == 0) or step in also:
            fn()
    return hook
