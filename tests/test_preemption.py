"""kandinsky_common.preemption: signals become a flag while guarded, and nothing else changes."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from kandinsky_common.preemption import PreemptionGuard


def deliver(sig: int, guard: PreemptionGuard | None = None) -> None:
    os.kill(os.getpid(), sig)
    # Python runs the handler at its next bytecode boundary; allow for a slow delivery anyway.
    deadline = time.monotonic() + 2
    while guard is not None and not guard.requested and time.monotonic() < deadline:
        time.sleep(0.001)


def test_sigterm_sets_the_flag_and_handlers_are_restored():
    before_term = signal.getsignal(signal.SIGTERM)
    before_int = signal.getsignal(signal.SIGINT)
    with PreemptionGuard() as guard:
        assert guard.active and not guard.requested and guard.signal_name is None
        deliver(signal.SIGTERM, guard)
        assert guard.requested and guard.signal_name == "SIGTERM"
        deliver(signal.SIGTERM)  # a resent SIGTERM while saving must not kill the process
        assert guard.requested
        assert signal.getsignal(signal.SIGINT) is before_int  # SIGINT left alone by default
    assert not guard.active
    assert signal.getsignal(signal.SIGTERM) is before_term
    assert signal.getsignal(signal.SIGINT) is before_int


def test_sigint_is_guarded_on_request_and_a_second_one_interrupts():
    # The second Ctrl-C runs the handler from before the guard: make it Python's own, whatever an
    # earlier test in this process left installed.
    outside = signal.signal(signal.SIGINT, signal.default_int_handler)
    before = signal.getsignal(signal.SIGINT)
    with PreemptionGuard(sigint=True) as guard:
        deliver(signal.SIGINT, guard)
        assert guard.requested and guard.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            deliver(signal.SIGINT)
            # The handler raises at a bytecode boundary of the main thread: under load (or when
            # another thread took the signal) that can be well after the kill.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is before
    signal.signal(signal.SIGINT, outside)


def test_nested_guards_restore_in_order():
    outer_before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as outer:
        with PreemptionGuard() as inner:
            deliver(signal.SIGTERM, inner)
        assert inner.requested and not outer.requested
        deliver(signal.SIGTERM, outer)
        assert outer.requested
    assert signal.getsignal(signal.SIGTERM) is outer_before


def test_guard_outside_the_main_thread_is_inactive():
    result = {}

    def run():
        with PreemptionGuard() as guard:
            result["active"] = guard.active
            result["handler"] = signal.getsignal(signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert result == {"active": False, "handler": before}
