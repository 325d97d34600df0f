"""Ctrl-C (SIGINT) and SIGTERM, the one place that handles them.

Handlers can only be set from the main thread; elsewhere both context managers leave
the signals as they are.
"""

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """Within this context, SIGTERM (a scheduler's or `kill`'s stop) raises
    `KeyboardInterrupt("terminated")`, as Ctrl-C raises `KeyboardInterrupt`, so that a
    program handles both stops in one `except KeyboardInterrupt`."""

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt("terminated")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopRequests:
    """Ctrl-C and SIGTERM while training: the first asks the loop to stop after the
    current iteration (`requested` becomes true), a second raises `KeyboardInterrupt`
    at once. A flag, not an exception raised anywhere: a `KeyboardInterrupt` can land
    inside a compile or a garbage-collection callback, and be lost there."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] | None = None

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._request) for s in _SIGNALS}
        return self

    def _request(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nstopping after this iteration (press Ctrl-C again to stop now)",
            file=sys.stderr,
        )

    def hold(self) -> None:
        """Ignore further signals (while the last good state is being saved)."""
        if self.previous is not None:
            for s in _SIGNALS:
                signal.signal(s, signal.SIG_IGN)

    def __exit__(self, *exc_info: object) -> None:
        if self.previous is not None:
            for s, handler in self.previous.items():
                signal.signal(s, handler)
            self.previous = None
