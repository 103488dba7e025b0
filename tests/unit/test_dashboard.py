"""The dashboard's pages and data endpoints in-process (the browser test is tests/dashboard)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from pipeline.api.queues import drain_estimate
from pipeline.api.views import task_times
from pipeline.config import Settings, use_settings
from pipeline.fleet.registry import QueueView, get_registry
from pipeline.history import History
from pipeline.security.audit import open_audit_log
from pipeline.services import Services, build_services
from pipeline.store import State, Task, new_task_id
from tests.conftest import TEST_SECRET, in_process_api

#: No RabbitMQ answers here: the dashboard must still show what the store knows.
NOWHERE = SecretStr("amqp://guest:guest@127.0.0.1:9/%2F")


@pytest.fixture
def services(tmp_path: Path, stub_broker) -> Services:  # type: ignore[no-untyped-def]
    settings = Settings(
        data_dir=tmp_path / "data",
        secret_key=TEST_SECRET,
        file_access="shared",
        broker_url=NOWHERE,
        broker_management_url="http://127.0.0.1:9",
    )
    return build_services(use_settings(settings))


@pytest.fixture
def client(services: Services, stub_broker) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    with in_process_api(services, stub_broker) as c:
        yield c


def make_task(
    services: Services, kind: str = "transcribe", queue: str = "gpu", filename: str = "a.mp3"
) -> Task:
    route = {"queue": queue, "priority": "high", "reasons": [f"{queue}: because the test says so"]}
    task = Task(new_task_id(), kind, State.queued, filename, {"path": "x"}, {}, route)
    return services.store.create(task)


def test_the_pages_hold_no_data_and_load_nothing_from_elsewhere(client: TestClient) -> None:
    anonymous = TestClient(client.app)
    for path in ("/dashboard", "/dashboard/tasks/abc", "/dashboard/workers/w1", "/dashboard/dead/m1"):
        page = anonymous.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "connect-src 'self'" in page.headers["content-security-policy"]
    html = anonymous.get("/dashboard").text
    loaded = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert set(loaded) == {"/dashboard", "/dashboard/assets/dashboard.css", "/dashboard/assets/dashboard.js"}
    for name in ("dashboard.js", "dashboard.css"):
        asset = anonymous.get(f"/dashboard/assets/{name}")
        assert asset.status_code == 200 and asset.headers["x-content-type-options"] == "nosniff"
        # The only URL in the script is SVG's namespace: no CDN, no other server.
        assert set(re.findall(r"https?://[^\s\"'`]+", asset.text)) <= {"http://www.w3.org/2000/svg"}
    for name in ("app.py", "..%2Fapp.py", "dashboard.html.bak"):
        assert anonymous.get(f"/dashboard/assets/{name}").status_code == 404


def test_the_data_needs_a_readonly_key(client: TestClient, services: Services) -> None:
    anonymous = TestClient(client.app)
    for path in ("/api/v1/dashboard", "/api/v1/dashboard/history", "/api/v1/queues"):
        assert anonymous.get(path).status_code == 401
    key, _ = services.apikeys.create("watcher", "readonly")
    data = anonymous.get("/api/v1/dashboard", headers={"Authorization": f"Bearer {key}"})
    assert data.status_code == 200, data.text
    assert data.json()["you"] == {"name": "watcher", "role": "readonly"}
    # Readonly looks; it cannot act.
    task = make_task(services)
    refused = anonymous.post(f"/api/v1/tasks/{task.id}/cancel", headers={"X-API-Key": key})
    assert refused.status_code == 403
    assert anonymous.post("/api/v1/dead/retry", json={}, headers={"X-API-Key": key}).status_code == 403


def test_workers_show_gpu_vram_current_tasks_counts_and_speed(client: TestClient, services: Services) -> None:
    task = make_task(services, filename="talk.mp4")
    services.store.mark_running(task.id, "box-1", 1)
    services.store.set_progress(task.id, {"stage": "transcribing", "percent": 40.0})
    beat = {
        "worker": "box-1", "session": "s1", "host": "gpu-host", "pid": 10, "capability": "gpu",
        "queues": ["gpu"], "threads": 1, "current": [task.id], "done": 7, "failed": 2,
        "hardware": {"gpus": [{"name": "NVIDIA L4", "vram_total_mb": 23034, "vram_free_mb": 19034}]},
        "speed": {"realtime_factor": 0.05, "task_s": 3.0, "samples": 7}, "ts": time.time(),
    }  # fmt: skip
    get_registry(services.settings).heartbeat(beat)
    data = client.get("/api/v1/dashboard").json()
    [worker] = data["workers"]
    assert worker["id"] == "box-1" and worker["host"] == "gpu-host" and worker["state"] == "alive"
    assert worker["capability"] == "gpu" and worker["processes"] == 1
    assert worker["gpu"] == {"count": 1, "name": "NVIDIA L4", "vram_used_mb": 4000, "vram_total_mb": 23034}
    assert worker["done"] == 7 and worker["failed"] == 2
    assert worker["audio_s_per_s"] == 20.0  # 0.05 s of work per second of audio
    [current] = worker["current"]
    assert current["id"] == task.id and current["filename"] == "talk.mp4"
    assert current["progress"] == {"stage": "transcribing", "percent": 40.0}
    assert data["workers_by_state"]["alive"] == 1
    page = client.get("/api/v1/dashboard/workers/box-1").json()
    assert [t["id"] for t in page["tasks"]] == [task.id] and page["history"][0]["event"] == "joined"
    assert client.get("/api/v1/dashboard/workers/nobody").status_code == 404


def test_queues_without_rabbitmq_still_show_what_the_store_knows(
    client: TestClient, services: Services
) -> None:
    for priority_queue in ("gpu", "gpu", "cpu"):
        make_task(services, queue=priority_queue)
    data = client.get("/api/v1/dashboard").json()["queues"]
    assert data["source"] is None and "management API" in data["error"]
    queues = {q["name"]: q for q in data["queues"]}
    assert set(queues) == {"gpu", "cpu", "control"}
    assert queues["gpu"]["waiting_by_priority"] == {"high": 2}
    assert queues["cpu"]["waiting_by_priority"] == {"high": 1}
    assert queues["gpu"]["messages"] is None


def test_tasks_show_route_reroutes_times_outputs_and_filter(client: TestClient, services: Services) -> None:
    store = services.store
    spoken = make_task(services, "transcribe", "gpu", "talk.mp4")
    document = make_task(services, "convert", "cpu", "report.html")
    store.reroute([(spoken.id, "gpu", "cpu", "no live gpu worker for 90s")], by="sweep")
    store.mark_running(spoken.id, "cpu-1", 1)
    outputs = [{"format": "txt", "path": f"tasks/{spoken.id}/output/talk.txt", "sha256": "0", "size": 1}]
    store.mark_done(spoken.id, outputs, {"timings": {"load_s": 0.5, "transcribe_s": 1.5}}, "cpu-1")
    store.mark_running(document.id, "cpu-2", 1)
    store.mark_failed(document.id, "bad input: not HTML", "cpu-2")

    rows = {t["id"]: t for t in client.get("/api/v1/dashboard").json()["tasks"]}
    row = rows[spoken.id]
    assert row["queue"] == "cpu" and row["reasons"][-1] == "no live gpu worker for 90s"
    assert [(m["from"], m["to"], m["by"]) for m in row["reroutes"]] == [("gpu", "cpu", "sweep")]
    assert row["processing_s"] == 2.0 and row["outputs"] == ["txt"]
    assert row["wait_s"] is not None and row["transfer_s"] is not None
    assert rows[document.id]["error"] == "bad input: not HTML"

    def ids(**filters: str) -> set[str]:
        return {t["id"] for t in client.get("/api/v1/dashboard", params=filters).json()["tasks"]}

    assert ids(state="failed") == {document.id}
    assert ids(kind="transcribe") == {spoken.id}
    assert ids(worker="cpu-2") == {document.id}
    assert ids(state="done", kind="convert") == set()
    assert client.get("/api/v1/dashboard", params={"state": "lost"}).status_code == 422
    page = client.get(f"/api/v1/dashboard/tasks/{spoken.id}").json()
    assert page["row"]["reroutes"] and [e["event"] for e in page["events"]][-1] == "done"


def test_task_times_add_up() -> None:
    task = {"created_at": 100.0, "started_at": 130.0, "finished_at": 200.0,
            "result": {"timings": {"load_s": 5.0, "transcribe_s": 45.0}}}  # fmt: skip
    assert task_times(task, now=500.0) == {"wait_s": 30.0, "transfer_s": 20.0, "processing_s": 50.0,
                                           "total_s": 100.0}  # fmt: skip
    reported = {**task, "result": {"timings": {"convert_s": 10.0, "download_s": 3.0, "upload_s": 1.0}}}
    assert task_times(reported, 500.0)["transfer_s"] == 4.0
    queued = {"created_at": 100.0, "started_at": None, "finished_at": None, "result": {}}
    assert task_times(queued, now=160.0) == {"wait_s": 60.0, "transfer_s": None, "processing_s": None,
                                             "total_s": 60.0}  # fmt: skip


def test_drain_estimate_says_how_it_was_worked_out() -> None:
    view = QueueView(queue="gpu", live=2, known=2, down_since=None, realtime_factor=None, task_s=30.0,
                     in_flight=0, workers=1)  # fmt: skip
    assert drain_estimate(0, None, view) == (0.0, "empty")
    assert drain_estimate(10, 0.5, view) == (20.0, "acknowledgement rate")
    assert drain_estimate(10, 0.0, view) == (150.0, "median task time of live workers")
    none = QueueView(queue="gpu", live=0, known=1, down_since=1.0, realtime_factor=None, task_s=None,
                     in_flight=0, workers=0)  # fmt: skip
    assert drain_estimate(10, None, none) == (None, "no live worker")


def test_history_is_in_the_store_and_survives_a_restart(
    client: TestClient, services: Services, database: Path | str
) -> None:
    history = History(database)
    store = type(services.store)(database)
    start = time.time() - 600
    for minute in range(3):
        task = store.create(
            Task(new_task_id(), "transcribe", State.queued, "a.mp3", {}, {}, {"queue": "gpu"})
        )
        store.mark_done(task.id, [], {}, "w")
        gpu = {"messages": 5 - minute, "consumers": 1, "dead": 0, "live": 1}
        history.record({"gpu": gpu, "cpu": {"messages": 0, "consumers": 1, "dead": 0, "live": 1}})
    reopened = History(database)  # a restarted server reads the same rows
    points = reopened.series(start)
    assert [p["queues"]["gpu"]["messages"] for p in points] == [5, 4, 3]
    assert sum(p["queues"]["gpu"]["done"] for p in points) == 3
    assert all(p["queues"]["cpu"]["done"] == 0 for p in points)
    merged = reopened.series(start, max_points=1)
    assert len(merged) == 1 and merged[0]["queues"]["gpu"]["done"] == 3
    assert merged[0]["queues"]["gpu"]["messages"] == 4.0


def test_old_samples_are_deleted_as_new_ones_are_written(tmp_path: Path) -> None:
    history = History(tmp_path / "tasks.db")
    day = 24 * 3600.0
    for age_days in (20, 16, 13, 1):
        history.record({"gpu": {"live": 1}}, now=time.time() - age_days * day)
    kept = [round((time.time() - p["ts"]) / day) for p in history.series(time.time() - 30 * day)]
    assert kept == [13, 1]


def test_history_endpoint_reads_the_sweeps_samples(client: TestClient, services: Services) -> None:
    History(services.settings).record({"gpu": {"messages": 2, "live": 0}, "cpu": {"messages": 1, "live": 1}})
    points = client.get("/api/v1/dashboard/history", params={"hours": 1}).json()["points"]
    assert len(points) == 1 and points[0]["queues"]["gpu"]["messages"] == 2


def test_cancel_from_the_dashboard_is_audited(client: TestClient, services: Services, tmp_path: Path) -> None:
    open_audit_log(tmp_path / "audit.log")
    task = make_task(services)
    assert client.post(f"/api/v1/tasks/{task.id}/cancel", json={"reason": "from the page"}).status_code == 200
    entries = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert {"event": "task.cancel", "by": "tests", "task": task.id, "reason": "from the page"}.items() <= {
        k: v for e in entries if e["event"] == "task.cancel" for k, v in e.items()
    }.items()
