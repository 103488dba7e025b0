"""Our broker calls middleware hooks as Dramatiq does, skipping only Middleware's own no-ops."""

from __future__ import annotations

from typing import Any

import pytest
from dramatiq import Middleware
from dramatiq.middleware import SkipMessage

from pipeline.brokers.rabbitmq import PipelineRabbitmqBroker

URL = "amqp://guest:guest@127.0.0.1:5672/"  # never connected to: hooks need no broker


class Record(Middleware):
    """Writes each hook it sees to ``calls``; ``fail`` names a hook to raise in."""

    def __init__(self, name: str, calls: list[str], fail: str = "", error: type[Exception] = RuntimeError):
        self.name, self.calls, self.fail, self.error = name, calls, fail, error

    def _seen(self, hook: str) -> None:
        self.calls.append(f"{self.name}.{hook}")
        if hook == self.fail:
            raise self.error(hook)

    def before_process_message(self, broker: Any, message: Any) -> None:
        self._seen("before")

    def after_process_message(self, broker: Any, message: Any, *, result: Any = None, exception: Any = None):
        self._seen("after")


class Silent(Middleware):
    """Implements nothing: none of its hooks is worth a call."""


def test_hooks_run_in_dramatiqs_order_with_middleware_added_later() -> None:
    calls: list[str] = []
    broker = PipelineRabbitmqBroker(url=URL, middleware=[Record("a", calls), Silent(), Record("b", calls)])
    broker.emit_before("process_message", None)
    broker.emit_after("process_message", None, result=None)
    assert calls == ["a.before", "b.before", "b.after", "a.after"]

    calls.clear()
    broker.add_middleware(Record("c", calls))
    broker.add_middleware(Record("first", calls), before=Record)
    broker.emit_before("process_message", None)
    broker.emit_after("process_message", None, result=None)
    assert calls == [
        "first.before", "a.before", "b.before", "c.before",
        "c.after", "b.after", "a.after", "first.after",
    ]  # fmt: skip


def test_a_failing_hook_is_logged_and_the_others_still_run(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    broker = PipelineRabbitmqBroker(
        url=URL, middleware=[Record("a", calls, fail="before"), Record("b", calls)]
    )
    broker.emit_before("process_message", None)
    assert calls == ["a.before", "b.before"]
    assert "Unexpected failure in before_process_message" in caplog.text


def test_skip_message_raised_before_a_message_stops_the_hooks_after_it() -> None:
    calls: list[str] = []
    middleware = [Record("a", calls, fail="before", error=SkipMessage), Record("b", calls)]
    broker = PipelineRabbitmqBroker(url=URL, middleware=middleware)
    with pytest.raises(SkipMessage):
        broker.emit_before("process_message", None)
    assert calls == ["a.before"]
