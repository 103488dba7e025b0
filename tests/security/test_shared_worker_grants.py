"""A worker on the server's host (``MORAG_FILE_ACCESS=shared``) runs its tasks, and a task message
forged onto its queue, or one carrying a grant stolen from another task, makes it fetch nothing and
write nothing (real server, real RabbitMQ, real worker)."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import dramatiq
import pytest

from pipeline.brokers.rabbitmq import build_rabbitmq_broker
from pipeline.config import Settings
from pipeline.security.grants import issue_grant
from tests.conftest import Stack, queue_depth, wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` and its SHA-256."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def forged_job(task_id: str, victim: dict[str, Any], grant: str | None) -> dict[str, Any]:
    """A task message's job of the right shape, for a task of its own, pointing at ``victim``'s input."""
    job = {
        "task_id": task_id,
        "kind": "convert",
        "filename": victim["filename"],
        "input": {k: victim["input"][k] for k in ("path", "sha256", "size")},
        "media": victim["input"]["media"],
        "options": {},
        "route": {"queue": "cpu", "gpu": "prefer"},
    }
    return job if grant is None else {**job, "grant": grant}


def test_a_shared_disk_worker_runs_its_tasks_and_nothing_a_forged_message_asks(
    stack: Stack, samples: Path
) -> None:
    stack.start_server()
    stack.start_worker("cpu", name="local-cpu", enroll=False, MORAG_FILE_ACCESS="shared")
    stack.wait_consumers("cpu")
    proc = stack.cli("submit", "--json", str(samples / "report.html"))
    assert proc.returncode == 0, proc.stderr + stack.all_logs()
    done = json.loads(proc.stdout)
    assert done["state"] == "done" and done["worker"] == "local-cpu"
    assert "Quarterly ingestion report" in done["text"]

    victim = stack.get(f"/api/v1/tasks/{done['id']}").json()
    # A task still open, waiting for a GPU: a forged message naming it must not touch it either.
    proc = stack.cli("submit", "--no-wait", "--gpu", "require", str(samples / "speech.mp3"))
    assert proc.returncode == 0, proc.stderr
    waiting = stack.get(f"/api/v1/tasks/{proc.stdout.split()[0]}").json()
    assert waiting["state"] == "queued"
    files = stack.data_dir / "files"
    before = snapshot(files)
    secret = stack.env["MORAG_SECRET_KEY"].encode()
    inputs = [victim["input"]["path"]]
    no_grant, other_secret, stolen = (uuid.uuid4().hex for _ in range(3))
    jobs = [
        forged_job(no_grant, victim, None),
        forged_job(other_secret, victim, issue_grant(b"w" * 48, other_secret, [], 600, "cpu")),
        forged_job(stolen, victim, issue_grant(secret, victim["id"], inputs, 600, "cpu")),
        forged_job(waiting["id"], victim, None),
    ]
    broker = build_rabbitmq_broker(Settings(broker_url=stack.env["MORAG_BROKER_URL"]))
    try:
        for job in jobs:
            broker.enqueue(dramatiq.Message("cpu", "convert_document", (), {"job": job}, {}))
    finally:
        broker.close()

    # Each is refused as bad input, at once: failed, not retried, and dead-lettered.
    url = stack.env["MORAG_BROKER_URL"]
    wait_for("the forged messages to be refused", lambda: queue_depth(url, "cpu.XQ") >= 4, stack=stack)
    assert queue_depth(url, "cpu.XQ") == 4
    log = stack.log("local-cpu")
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    refusals = [
        entry for entry in lines if entry.get("msg") == "task message refused: its grant opens nothing"
    ]
    reasons = {r["task_id"]: r["reason"] for r in refusals}
    assert reasons[no_grant] == f"task {no_grant}: the message carries no transfer grant"
    assert reasons[other_secret].endswith("invalid transfer grant: Signature verification failed")
    assert reasons[stolen].startswith(
        f"the transfer grant of task {victim['id']} does not open task {stolen}"
    )
    assert reasons[waiting["id"]] == f"task {waiting['id']}: the message carries no transfer grant"
    # The open task it named was not told anything: still queued, no event added.
    assert stack.get(f"/api/v1/tasks/{waiting['id']}").json()["events"] == waiting["events"]
    # Nothing was read into a task, written, or changed: not in the store's files, not in its tasks.
    assert snapshot(files) == before
    for task_id in (no_grant, other_secret, stolen):
        assert not (files / "tasks" / task_id).exists()
        assert stack.get(f"/api/v1/tasks/{task_id}").status_code == 404
    after = stack.get(f"/api/v1/tasks/{victim['id']}").json()
    assert {k: after[k] for k in ("state", "outputs", "events")} == {
        k: victim[k] for k in ("state", "outputs", "events")
    }
