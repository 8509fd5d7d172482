"""How orbax and tensorstore fail, in one line each: damage a fallback to an older checkpoint can
fix, a checkpoint this user may not read, and the repeated reports (absl logs, coroutines closed at
garbage collection) that follow a failure already raised to the caller."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import threading
import time
from pathlib import Path

import orbax.checkpoint as ocp

from kandinsky_common import checkpoints as ck
from kandinsky_common.errors import UserError

STATE_ITEM = ck.FLAX_STATE_ITEM


def root_cause(e: BaseException) -> str:
    """One line for the deepest explicit cause: tensorstore's own message names file and array."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = str(e).strip().splitlines()
    text = lines[0].split(" See full TensorStore details")[0] if lines else type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def is_damage(e: BaseException) -> bool:
    """Whether a failed read means missing or corrupt files (what a fallback to an older
    checkpoint can fix), as opposed to memory, a bad argument or a bug."""
    for x in ck.exception_chain(e):
        if isinstance(x, MemoryError) or "RESOURCE_EXHAUSTED" in str(x):
            return False
    for x in ck.exception_chain(e):
        if isinstance(x, PermissionError):
            return False
        if isinstance(x, OSError | EOFError | json.JSONDecodeError | UnicodeDecodeError):
            return True
        if _TENSORSTORE_DAMAGE.search(str(x)):
            return True
    return False


def raise_unreadable(path: Path, e: BaseException) -> None:
    """A checkpoint this user may not read is intact: say so, with the fix."""
    for x in ck.exception_chain(e):
        if isinstance(x, PermissionError):
            raise UserError(
                f"checkpoint {path} cannot be read ({x}); give this user read access to it"
            ) from e


def describe_damage(e: BaseException) -> str:
    cause = root_cause(e)
    m = re.search(r'Error reading "([^"/]+)', cause)
    if m:
        return f"array {m.group(1)} cannot be read: {cause}"
    return f"{STATE_ITEM}/: {cause}"


def _is_aborted_read_report(unraisable) -> bool:
    # orbax 0.12 reads and writes arrays in parallel coroutines. When one fails, its event loop
    # closes with the others pending: their tensorstore callbacks then hit the closed loop, and
    # the coroutines, closed at garbage collection (maybe much later, even at interpreter exit),
    # turn GeneratorExit into a new exception (`except BaseException` in orbax's coroutines).
    # They land in sys.unraisablehook as tracebacks after the failure has been reported properly.
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return True
    code = getattr(unraisable.object, "cr_code", None)
    if code is None:
        return False
    return code.co_name == "_read_array_index_and_device_put" or _ORBAX_DIR in code.co_filename


_ORBAX_DIR = f"{Path(ocp.__file__).parent}"
# tensorstore's I/O failures: what CheckpointDamaged and a failed save report in one line.
TENSORSTORE_IO = re.compile(r"\b[A-Z_]+: Error (reading|writing)\b")
# What tensorstore and orbax say of missing or corrupt checkpoint files.
_TENSORSTORE_DAMAGE = re.compile(
    r"\b(DATA_LOSS|NOT_FOUND|OUT_OF_RANGE|FAILED_PRECONDITION): |Error (reading|opening|decoding)"
)


class _DropReportedIOErrors(logging.Filter):
    """orbax logs each failed array read or write with a traceback from its worker threads
    (absl), and asyncio logs the futures it left unretrieved; the store raises the same failure
    to its caller as one line (CheckpointDamaged, or the write failure), so these repeat it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        while exc is not None:
            if TENSORSTORE_IO.search(str(exc)):
                return False
            exc = exc.__cause__ or exc.__context__
        return True


def drop_aborted_read_reports() -> None:
    """Filter those reports for the rest of the process; everything else passes through."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_aborted_reads", False):
        return
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_DropReportedIOErrors())

    def hook(unraisable) -> None:
        if not _is_aborted_read_report(unraisable):
            previous(unraisable)

    hook.drops_aborted_reads = True
    sys.unraisablehook = hook


def join_writer_threads(timeout: float = 60.0) -> None:
    """Wait for orbax's background writers after a failed save.

    One failed future (the metadata file on a full disk) ends `wait_until_finished` while the
    array writers of the same save are still running; they would recreate files in the tmp folder
    after the caller removed it."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread is threading.current_thread() or not thread.is_alive():
            continue
        if type(thread).__module__.startswith("orbax."):
            # orbax's threads re-raise their own failure from join(): the one being reported
            with contextlib.suppress(Exception):
                thread.join(max(0.0, deadline - time.monotonic()))
