"""Which messages ModelAffinity puts back: only a transcription whose model another live worker
of the same queue holds, once. (The whole path, on RabbitMQ with two workers and two models, is
tests/integration/test_model_affinity.py.)"""

from __future__ import annotations

from typing import Any

import dramatiq
import pytest
from dramatiq.broker import MessageProxy
from dramatiq.middleware import SkipMessage

from pipeline.identity import worker_id
from pipeline.middleware.model_affinity import DEFERRED, ModelAffinity
from pipeline.task_message import affinity_of, model_affinity


class Recorder:
    """A broker that records what is enqueued, and with which delay."""

    def __init__(self) -> None:
        self.enqueued: list[tuple[dramatiq.Message, int | None]] = []

    def enqueue(self, message: dramatiq.Message, *, delay: int | None = None) -> dramatiq.Message:
        self.enqueued.append((message, delay))
        return message


def message(queue: str, affinity: dict[str, Any] | None, **options: Any) -> MessageProxy:
    job: dict[str, Any] = {"kind": "transcribe", "options": {"model": "large-v3"}}
    if affinity is not None:
        job["affinity"] = affinity
    return MessageProxy(dramatiq.Message(queue, "transcribe", (), {"job": job}, options))


HELD_ELSEWHERE = model_affinity("large-v3", "gpu", ["gpu-box-2"])


def test_a_task_whose_model_another_worker_holds_is_put_back_once_with_the_delay() -> None:
    broker = Recorder()
    with pytest.raises(SkipMessage, match="put back for a worker that holds large-v3"):
        ModelAffinity(delay_s=2.5).before_process_message(broker, message("gpu", HELD_ELSEWHERE))  # type: ignore[arg-type]
    [(copy, delay)] = broker.enqueued
    assert delay == 2500 and copy.options[DEFERRED] == worker_id()
    # The copy, when offered to this worker again, runs here.
    ModelAffinity(delay_s=2.5).before_process_message(broker, MessageProxy(copy))  # type: ignore[arg-type]
    assert len(broker.enqueued) == 1


@pytest.mark.parametrize(
    ("queue", "affinity", "delay_s"),
    [
        ("gpu", None, 3.0),  # no worker holds the model
        ("cpu", HELD_ELSEWHERE, 3.0),  # moved to cpu: the holders were GPU workers
        ("gpu", model_affinity("large-v3", "gpu", [worker_id()]), 3.0),  # this worker holds it
        ("gpu", HELD_ELSEWHERE, 0.0),  # deferral off
    ],
)
def test_other_tasks_run_where_they_are(queue: str, affinity: dict[str, Any] | None, delay_s: float) -> None:
    broker = Recorder()
    ModelAffinity(delay_s).before_process_message(broker, message(queue, affinity))  # type: ignore[arg-type]
    assert broker.enqueued == []


def test_a_job_names_holders_only_when_there_are_some() -> None:
    assert model_affinity("tiny.en", "gpu", []) is None
    assert affinity_of({"affinity": model_affinity("tiny.en", "gpu", ["b", "a"])})["workers"] == ["a", "b"]
    assert affinity_of({}) == {} and affinity_of({"affinity": "garbage"}) == {}
