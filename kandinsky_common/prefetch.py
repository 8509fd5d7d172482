"""A background thread that produces the next batches while the accelerator runs the step."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator


class Prefetcher:
    """Runs an iterable on a background thread, `depth` items ahead of the consumer.

    The next batches are decoded while the accelerator runs the step. An exception in the producer
    is re-raised by next(); close() (or leaving the `with` block) stops the producer and closes a
    generator source on its own thread.
    """

    _POLL = 0.1

    def __init__(self, iterable: Iterable, depth: int = 2):
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(
            target=self._produce, args=(iter(iterable),), name="kandinsky-prefetch", daemon=True
        )
        self._thread.start()

    def _put(self, message: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(message, timeout=self._POLL)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, source: Iterator) -> None:
        try:
            for item in source:
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as e:  # handed to the consumer, who decides
            self._put(("error", e))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        while True:
            try:
                kind, payload = self._queue.get(timeout=self._POLL)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._done = True
                    raise StopIteration from None
        if kind == "item":
            return payload
        self._done = True
        if kind == "error":
            raise payload
        raise StopIteration

    def close(self, timeout: float | None = 30.0) -> None:
        self._done = True
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
