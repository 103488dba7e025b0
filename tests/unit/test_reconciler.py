"""The reconciler: tasks recorded but never published are published; running tasks nobody holds
are delivered again, then failed with the reason (Dramatiq's stub broker; the RabbitMQ path is in
tests/chaos/test_every_task_ends.py)."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import pytest

from pipeline.config import Settings
from pipeline.fleet.reconciler import Reconciler
from pipeline.fleet.registry import Registry
from pipeline.services import Services, build_services
from pipeline.store import State, Task
from pipeline.submission import SubmitOptions, record
from tests.conftest import SAMPLES


@pytest.fixture
def services(tmp_path: Path) -> Services:
    settings = Settings(
        data_dir=tmp_path / "data", secret_key="s" * 48, file_access="shared", max_deliveries=2,
        task_lost_after_s=60, publish_wait_s=0,
    )  # fmt: skip
    return build_services(settings)


@pytest.fixture
def reconciler(services: Services, stub_broker) -> Reconciler:  # type: ignore[no-untyped-def]
    stub_broker.flush_all()
    yield Reconciler(services, Registry.from_settings(services.settings), stub_broker)
    stub_broker.flush_all()


def recorded(services: Services, tmp_path: Path) -> Task:
    """A document recorded as submit records it, its message never published."""
    upload = tmp_path / "upload"
    shutil.copy(SAMPLES / "report.html", upload)
    digest = hashlib.sha256(upload.read_bytes()).hexdigest()
    return record(services, upload, "report.html", digest, upload.stat().st_size, SubmitOptions(), lambda: 0)


def test_a_task_never_published_is_published(services: Services, reconciler: Reconciler, tmp_path: Path,
                                             stub_broker) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    task = recorded(services, tmp_path)
    assert reconciler.run(now=time.time()).published == []  # too young: its submit may still be trying
    report = reconciler.run(now=time.time() + 10)
    assert report.published == [task.id]
    assert stub_broker.queues["cpu"].qsize() == 1
    events = services.store.get(task.id).events
    assert [e["detail"]["by"] for e in events if e["event"] == "published"] == ["reconciler"]
    assert reconciler.run(now=time.time() + 10).published == []  # published once


def test_a_running_task_nobody_holds_is_delivered_again_then_failed(
    services: Services,
    reconciler: Reconciler,
    tmp_path: Path,
    stub_broker,  # type: ignore[no-untyped-def]
) -> None:
    task = recorded(services, tmp_path)
    store = services.store
    store.mark_published(task.id, "m-1", "cpu", by="submit")
    assert store.mark_running(task.id, "gone-worker", 1)
    assert reconciler.run(now=time.time() + 30).redelivered == []  # not silent long enough

    report = reconciler.run(now=time.time() + 61)
    assert report.redelivered == [task.id]
    again = store.get(task.id)
    assert again.state is State.queued and again.deliveries == 2
    requeued = [e for e in again.events if e["event"] == "requeued"]
    assert "gone-worker" in requeued[0]["detail"]["reason"]
    assert "no live worker holds it" in requeued[0]["detail"]["reason"]
    assert stub_broker.queues["cpu"].qsize() == 1

    assert store.mark_running(task.id, "gone-worker", 2)  # lost once more
    report = reconciler.run(now=time.time() + 61)
    assert report.failed == [task.id]
    failed = store.get(task.id)
    assert failed.state is State.failed
    assert "after 2 deliveries (MORAG_MAX_DELIVERIES=2)" in (failed.error or "")


def test_a_task_a_live_worker_holds_is_left_alone(services: Services, reconciler: Reconciler,
                                                  tmp_path: Path) -> None:  # fmt: skip
    task = recorded(services, tmp_path)
    services.store.mark_published(task.id, "m-1", "cpu", by="submit")
    services.store.mark_running(task.id, "busy", 1)
    now = time.time()
    beat = {"worker": "busy", "session": "s1", "queues": ["cpu"], "capability": "cpu", "current": [task.id]}
    reconciler.registry.heartbeat(beat, now=now + 60)
    assert reconciler.run(now=now + 61).redelivered == []
    assert services.store.get(task.id).state is State.running
