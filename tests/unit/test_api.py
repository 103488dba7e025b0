"""The HTTP API in-process, over Dramatiq's stub broker (the RabbitMQ path is in tests/integration)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from dramatiq import Worker
from fastapi.testclient import TestClient

from pipeline.api.app import create_app
from pipeline.api.auth import Authenticator
from pipeline.config import Settings, use_settings
from pipeline.security.ratelimit import FailureLimiter
from pipeline.services import build_services
from tests.conftest import TEST_SECRET, in_process_api


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, stub_broker) -> Iterator[tuple[TestClient, object]]:
    settings = use_settings(
        Settings(
            data_dir=tmp_path_factory.mktemp("data"),
            max_upload_mb=1,
            max_document_mb=1,
            secret_key=TEST_SECRET,
            file_access="shared",
        )
    )
    with in_process_api(build_services(settings), stub_broker) as client:
        yield client, stub_broker


def upload(client: TestClient, path: Path, name: str | None = None, **form: str):
    with path.open("rb") as f:
        return client.post("/api/v1/tasks", files={"file": (name or path.name, f)}, data=form)


def test_submit_records_routes_and_publishes(api, samples: Path) -> None:
    client, broker = api
    response = upload(client, samples / "talk.mp4", priority="high")
    assert response.status_code == 201
    task = response.json()
    assert task["state"] == "queued" and task["kind"] == "transcribe"
    assert task["route"]["queue"] == "cpu"  # no GPU worker connected
    assert "no GPU worker is connected" in task["route"]["reasons"][0]
    assert task["input"]["sha256"] and task["input"]["size"] == (samples / "talk.mp4").stat().st_size
    [message] = [m for m in broker.queues["cpu"].queue if task["id"] in m.decode()]
    assert b'"broker_priority":6' in message
    broker.flush_all()


def test_document_end_to_end_in_process(api, samples: Path) -> None:
    client, broker = api
    task = upload(client, samples / "report.html").json()
    early = client.get(f"/api/v1/tasks/{task['id']}/result")
    assert early.status_code == 409 and early.json()["detail"] == "no result: task is queued"
    worker = Worker(broker, worker_timeout=100)
    worker.start()
    try:
        broker.join("cpu")
        broker.join("control")
    finally:
        worker.stop()
    done = client.get(f"/api/v1/tasks/{task['id']}").json()
    assert done["state"] == "done", done
    result = client.get(f"/api/v1/tasks/{task['id']}/result")
    assert result.headers["content-type"].startswith("text/markdown")
    assert "## Volumes by kind" in result.text
    assert result.headers["x-content-sha256"] == next(
        o["sha256"] for o in done["outputs"] if o["format"] == "md"
    )
    missing = client.get(f"/api/v1/tasks/{task['id']}/result", params={"format": "srt"})
    assert missing.status_code == 404 and "this task has json, md" in missing.json()["detail"]


@pytest.mark.parametrize(
    ("name", "content", "status", "detail"),
    [
        ("clip.mp4", b"hello\n", 415, "the content is plain text, but the name says .mp4"),
        ("empty.wav", b"", 400, "the file is empty"),
        ("big.md", b"#" * (1024 * 1024 + 1), 413, "big.md: larger than the 1 MiB allowed for documents"),
    ],
)
def test_refusals(api, tmp_path: Path, name: str, content: bytes, status: int, detail: str) -> None:
    client, _ = api
    path = tmp_path / name
    path.write_bytes(content)
    response = upload(client, path)
    assert response.status_code == status
    assert detail in response.json()["detail"]


def test_bad_form_values_and_unknown_task(api, samples: Path) -> None:
    client, _ = api
    response = upload(client, samples / "report.html", priority="asap")
    assert response.status_code == 400 and "priority must be one of" in response.json()["detail"]
    assert client.get("/api/v1/tasks/nope").status_code == 404
    assert client.get("/api/v1/tasks", params={"state": "lost"}).status_code == 422


def test_health_and_openapi(api) -> None:
    client, _ = api
    assert client.get("/healthz").json()["status"] == "ok"
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/v1/tasks", "/api/v1/tasks/{task_id}", "/api/v1/tasks/{task_id}/result"} <= set(paths)


def test_healthz_answers_503_when_a_part_is_down(tmp_path: Path, stub_broker) -> None:
    """Each part's check is reported; one that fails or raises makes the server unhealthy."""
    from pipeline.health import Part, report

    services = build_services(Settings(data_dir=tmp_path / "data", secret_key="h" * 48))
    auth = Authenticator(services.apikeys, services.tokens, FailureLimiter())

    def scheduler() -> Part:
        raise RuntimeError("liveness process gone")

    parts = {"broker": lambda: Part(True, {}), "scheduler": scheduler}
    with TestClient(
        create_app(services, stub_broker, lambda: 0, auth, health=lambda: report(parts))
    ) as client:
        response = client.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "degraded" and body["parts"]["broker"] == {"ok": True}
    assert body["parts"]["scheduler"] == {"ok": False, "error": "RuntimeError: liveness process gone"}
