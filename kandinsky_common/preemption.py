"""Turn SIGTERM (and optionally SIGINT) into a flag the training loop polls at step boundaries.

Cloud TPU/GPU preemption and `kill`/Kubernetes send SIGTERM and then SIGKILL after a grace period.
The default action kills the process mid-step, losing everything since the last checkpoint. The
guard instead records the request; the loop sees `guard.requested` after the current step, saves a
checkpoint, waits for it to be written, and exits 0.

In a multi-process run every process gets its own signal at slightly different times: combine the
flags across processes (e.g. an all-reduce of `requested`) so that all of them save the same step.

    with PreemptionGuard() as guard:
        for step in ...:
            train_step()
            if guard.requested:
                save(step); break
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


class PreemptionGuard:
    """Context manager: while active, SIGTERM (and SIGINT if `sigint`) only set `requested`.

    With `sigint`, a second Ctrl-C runs the SIGINT handler that was installed before the guard
    (normally: KeyboardInterrupt), so a user who insists can stop a run stuck before its next step
    boundary. Repeated SIGTERMs are ignored: schedulers may resend it while the final checkpoint is
    being written, and dying then would lose that checkpoint.

    Signal handlers can only be installed from the main thread; elsewhere the guard is inactive
    (`active` is False) and never reports a request.
    """

    def __init__(self, sigint: bool = False):
        self._signals = (signal.SIGTERM, signal.SIGINT) if sigint else (signal.SIGTERM,)
        self._previous: dict[int, object] = {}
        self._received: int | None = None
        self.active = False

    @property
    def requested(self) -> bool:
        """True once a guarded signal arrived while the guard was active."""
        return self._received is not None

    @property
    def signal_name(self) -> str | None:
        """Name of the first signal received ("SIGTERM"), for the loop's log line."""
        return None if self._received is None else signal.Signals(self._received).name

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only a plain assignment here: the handler runs between two bytecodes of the main thread,
        # possibly inside logging or I/O, so anything that takes a lock could deadlock.
        if self._received is None:
            self._received = signum
            return
        if signum == signal.SIGINT:
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
            elif previous != signal.SIG_IGN:
                raise KeyboardInterrupt

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        self.active = True
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            # None means the previous handler was not installed from Python; SIG_DFL is the best
            # approximation Python can restore.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()
        self.active = False


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, then raise KeyboardInterrupt.

    For importing a framework: a KeyboardInterrupt raised while jaxlib's native extension is being
    initialised ends the interpreter in SIGSEGV instead of a clean stop. The import takes seconds,
    so the user's Ctrl-C still stops the command promptly. Outside the main thread it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
    if received:
        raise KeyboardInterrupt
