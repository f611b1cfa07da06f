"""The one signal-deferral helper: SIGINT and SIGTERM held during cleanup, then delivered."""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType

import pytest

from gguf_sandbox.signals import deferred_signals


def test_sigint_is_held_until_the_block_ends() -> None:
    reached_end = False
    with pytest.raises(KeyboardInterrupt), deferred_signals():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # a delivered SIGINT would raise here
        reached_end = True
    assert reached_end


def test_sigterm_is_held_then_delivered_to_the_previous_handler() -> None:
    seen: list[int] = []

    def handler(signum: int, _frame: FrameType | None) -> None:
        seen.append(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with deferred_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert seen == []
        assert seen == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_each_signal_is_delivered_once_in_arrival_order() -> None:
    seen: list[int] = []

    def handler(signum: int, _frame: FrameType | None) -> None:
        seen.append(signum)

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with deferred_signals():
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
                os.kill(os.getpid(), signum)
                time.sleep(0.02)
        assert seen == [signal.SIGTERM, signal.SIGINT]
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def test_outside_the_main_thread_it_is_a_no_op() -> None:
    entered: list[bool] = []

    def body() -> None:
        with deferred_signals():
            entered.append(signal.getsignal(signal.SIGINT) is signal.default_int_handler)

    worker = threading.Thread(target=body)
    worker.start()
    worker.join()
    assert entered == [signal.getsignal(signal.SIGINT) is signal.default_int_handler]
