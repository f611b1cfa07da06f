"""Signal deferral: hold Ctrl-C and SIGTERM while cleanup or bookkeeping must not be cut short."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

# What a user or a supervisor sends to stop a run: both must wait until cleanup is done.
DEFERRED_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def deferred_signals(signals: tuple[signal.Signals, ...] = DEFERRED_SIGNALS) -> Iterator[None]:
    """Hold `signals` until the block ends, then deliver each received one once, in arrival order.

    Delivery goes through the handler that was in place before (Ctrl-C raises KeyboardInterrupt, a
    SIGTERM handler of the runner raises it too, a default SIGTERM ends the process), so a second Ctrl-C
    during cleanup cannot leak what the cleanup removes. Only the main thread receives signals and may set
    handlers: elsewhere this is a no-op. A handler not installed from Python (getsignal() is None) cannot
    be put back, so that signal is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def remember(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)

    previous: dict[signal.Signals, Callable[[int, FrameType | None], Any] | int] = {}
    for signum in signals:
        handler = signal.getsignal(signum)
        if handler is None:
            continue
        previous[signum] = handler
        signal.signal(signum, remember)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for number in dict.fromkeys(received):
            signal.raise_signal(number)
