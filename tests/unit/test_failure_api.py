"""The server's side of failures in-process: the cancel endpoint, and completions that come
too late or twice (the RabbitMQ path is in tests/chaos)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from pipeline.services import Services, get_services
from pipeline.store import State, Task, new_task_id
from tests.conftest import in_process_api


@pytest.fixture
def services(stub_broker) -> Services:  # type: ignore[no-untyped-def]
    return get_services()


@pytest.fixture
def client(services: Services, stub_broker) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    # No broker at this address: the cancellation notice cannot be sent.
    dead_end = SecretStr("amqp://guest:guest@127.0.0.1:9/%2F")
    unreachable = services.settings.model_copy(update={"broker_url": dead_end})
    local = Services(**{**services.__dict__, "settings": unreachable})
    with in_process_api(local, stub_broker) as c:
        yield c


def make(services: Services, state: State = State.queued) -> Task:
    task = Task(new_task_id(), "convert", State.queued, "a.md", {"path": "x"}, {}, {"queue": "cpu"})
    services.store.create(task)
    if state is State.running:
        services.store.mark_running(task.id, "w1", 1)
    return task


def test_cancel_endpoint(client: TestClient, services: Services) -> None:
    task = make(services, State.running)
    response = client.post(f"/api/v1/tasks/{task.id}/cancel")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["state"] == "canceled" and body["error"] == "canceled by the user"
    assert body["notified"] is False
    assert [e["event"] for e in body["events"]][-2:] == ["canceled", "cancel notice not sent"]

    again = client.post(f"/api/v1/tasks/{task.id}/cancel")
    assert again.status_code == 409
    assert again.json()["detail"] == f"task {task.id} is canceled: nothing to cancel"
    assert client.post(f"/api/v1/tasks/{'0' * 32}/cancel").status_code == 404


def write_output(services: Services, task_id: str) -> dict:
    from pipeline.transfer.checksums import sha256_file

    path = services.files.resolve(f"tasks/{task_id}/output/a.md")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# A\n")
    return {"path": f"tasks/{task_id}/output/a.md", "sha256": sha256_file(path), "size": 4, "format": "md"}


def test_completions_after_the_end_change_nothing(services: Services) -> None:
    from pipeline.actors.control import task_completed

    done = make(services, State.running)
    output = write_output(services, done.id)
    task_completed.fn(done.id, [output], {"n": 1}, "w1", 0.0)
    task_completed.fn(done.id, [output], {"n": 2, "reused": True}, "w2", 0.0)
    after = services.store.get(done.id)
    assert after.state == State.done and after.result == {"n": 1} and after.worker == "w1"
    assert [e["event"] for e in after.events].count("done") == 1
    assert after.events[-1] == {**after.events[-1], "event": "completion ignored"}
    assert after.events[-1]["detail"] == {"worker": "w2", "state": "done"}

    canceled = make(services, State.running)
    services.store.mark_canceled(canceled.id, "canceled by the user")
    output = write_output(services, canceled.id)
    task_completed.fn(canceled.id, [output], {}, "w1", 0.0)
    assert services.store.get(canceled.id).state == State.canceled
    assert not Path(services.files.resolve(f"tasks/{canceled.id}/output")).exists()
