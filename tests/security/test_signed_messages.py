"""Only enrolled workers count: control messages are signed and verified (real RabbitMQ)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import dramatiq
import httpx
import pytest

from pipeline.brokers.rabbitmq import build_rabbitmq_broker
from pipeline.config import Settings
from pipeline.security import signatures
from tests.conftest import SPOKEN_WORDS, Stack, queue_info, wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def enroll(stack: Stack, worker: str, capability: str) -> dict[str, str]:
    proc = stack.cli("token", "issue", "--worker", worker, "--capability", capability)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines())


def audit_events(stack: Stack) -> list[dict]:
    path = stack.data_dir / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def secure(stack: Stack) -> Stack:
    """A server as users run it: out of development mode, the CLI with an admin key."""
    assert "MORAG_DEV_MODE" not in stack.env and stack.env["MORAG_API_KEY"]
    stack.start_server()
    return stack


def test_enrolled_worker_completes_tasks(secure: Stack, samples: Path) -> None:
    secure.start_worker("gpu", name="gpu-box-1")  # enrolled: a token, files over SFTP
    secure.wait_consumers("gpu")
    proc = secure.cli("submit", "--json", str(samples / "speech.mp3"))
    assert proc.returncode == 0, proc.stderr + secure.all_logs()
    task = json.loads(proc.stdout)
    assert task["worker"] == "gpu-box-1"
    assert all(word in task["text"].lower() for word in SPOKEN_WORDS)
    assert not [e for e in audit_events(secure) if e["event"] == "message.rejected"]


def test_plain_worker_on_the_server_host_completes_tasks(secure: Stack, samples: Path) -> None:
    """The README's `dramatiq pipeline.actors.cpu --queues cpu` with the server's settings: no token."""
    secure.start_worker("cpu", name="local-cpu", enroll=False, MORAG_FILE_ACCESS="shared")
    secure.wait_consumers("cpu")
    proc = secure.cli("submit", "--json", str(samples / "report.html"))
    assert proc.returncode == 0, proc.stderr + secure.all_logs()
    task = json.loads(proc.stdout)
    assert task["state"] == "done" and task["worker"] == "local-cpu"
    assert not [e for e in audit_events(secure) if e["event"] == "message.rejected"]
    listed = secure.get("/api/v1/workers").json()["workers"]
    assert "local-cpu" in [w["id"] for w in listed]


def test_worker_that_can_sign_nothing_refuses_to_boot(secure: Stack) -> None:
    """No token and no server secret: the worker says why and how to fix it, and takes no task."""
    secure.start_worker("cpu", name="rogue", enroll=False, MORAG_SECRET_KEY="")
    proc = secure.processes["rogue"]
    assert proc.wait(60) != 0
    log = secure.log("rogue")
    assert "cannot sign its reports" in log and "morag-pipeline token issue" in log
    assert "MORAG_SECRET_KEY" in log
    assert queue_info(secure.env["MORAG_BROKER_URL"], "cpu").get("consumers", 0) == 0


def test_a_worker_sharing_the_data_directory_with_another_secret_refuses_to_boot(secure: Stack) -> None:
    """On the server's host with the wrong MORAG_SECRET_KEY, a worker could verify no grant and sign
    no report the server believes: it says so and takes no task."""
    secure.start_worker("cpu", name="stranger", enroll=False, MORAG_FILE_ACCESS="shared",
                        MORAG_SECRET_KEY="w" * 48)  # fmt: skip
    assert secure.processes["stranger"].wait(60) != 0
    log = secure.log("stranger")
    assert "MORAG_SECRET_KEY is not the secret of the server whose data directory this worker shares" in log
    assert "w" * 48 not in log
    assert queue_info(secure.env["MORAG_BROKER_URL"], "cpu").get("consumers", 0) == 0


def test_unverifiable_outcomes_are_noted_and_the_task_still_ends(secure: Stack, samples: Path) -> None:
    """An enrolled worker whose message key is wrong: it reaches its tasks' files (its token is
    good), but each report it sends is refused, noted on its task, the task is delivered again, and
    it fails with the reason once it had MORAG_MAX_DELIVERIES messages."""
    secure.env["MORAG_MAX_DELIVERIES"] = "2"
    secure.stop("server")
    secure.start_server()
    secure.start_worker("cpu", name="stranger", MORAG_WORKER_KEY="k" * 64)
    secure.wait_consumers("cpu")
    proc = secure.cli("submit", "--json", str(samples / "report.html"), timeout=240)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    task = json.loads(proc.stdout)
    assert task["state"] == "failed"
    assert "could not be verified" in task["error"] and "bad signature" in task["error"]
    events = secure.get(f"/api/v1/tasks/{task['id']}").json()["events"]
    rejected = [e for e in events if e["event"] == "report rejected"]
    assert rejected and all(e["detail"]["worker"] == "stranger" for e in rejected)
    assert [e["event"] for e in events].count("published") == 2
    status = secure.cli("status", task["id"])
    assert "report rejected" in status.stdout
    # Its heartbeats were refused too: it is no worker of the registry, but `workers` says why.
    listing = secure.get("/api/v1/workers").json()
    assert "stranger" not in [w["id"] for w in listing["workers"]]
    refused = {r["worker"]: r for r in listing["refused"]}
    assert refused["stranger"]["refused"] >= 2 and "bad signature" in refused["stranger"]["last_reason"]
    shown = secure.cli("workers")
    assert "refused" in shown.stdout and "stranger" in shown.stdout, shown.stdout + shown.stderr


def publish(settings: Settings, actor: str, options: dict, **kwargs: object) -> None:
    broker = build_rabbitmq_broker(settings)
    try:
        broker.enqueue(dramatiq.Message("control", actor, (), kwargs, options))
    finally:
        broker.close()


def test_forged_replayed_and_revoked_messages_are_refused(secure: Stack, samples: Path) -> None:
    bundle = enroll(secure, "gpu-box-2", "gpu")
    other = enroll(secure, "cpu-box-9", "cpu")
    headers = {"Authorization": f"Bearer {secure.env['MORAG_API_KEY']}"}
    with (samples / "speech.mp3").open("rb") as f:
        task = httpx.post(
            f"{secure.url}/api/v1/tasks", files={"file": ("speech.mp3", f)}, headers=headers
        ).json()
    settings = Settings(broker_url=secure.env["MORAG_BROKER_URL"])
    token, key = bundle["MORAG_WORKER_TOKEN"], bundle["MORAG_WORKER_KEY"]
    token_id = _jti(token)
    args = {"task_id": task["id"], "attempt": 1, "worker": "gpu-box-2", "ts": time.time()}

    def signed(with_key: str = key, now: float | None = None, **kwargs: object) -> dict:
        block = signatures.sign("task_started", [], {**args, **kwargs}, token_id, with_key, now)
        return {signatures.OPTION: block}

    good = signed()
    # The block names the token by its id; the token (the worker's SFTP password) is not in it.
    assert good[signatures.OPTION][signatures.TOKEN_ID] == token_id
    assert token not in json.dumps(good) and key not in json.dumps(good)
    publish(settings, "task_started", good, **args)
    publish(settings, "task_started", good, **args)  # the same message again: applied once
    publish(settings, "task_started", signed(with_key="0" * 64), **args)  # forged key
    tampered = signed()
    publish(settings, "task_started", tampered, **{**args, "attempt": 7})  # altered after signing
    publish(settings, "task_started", signed(worker="cpu-box-9"), **{**args, "worker": "cpu-box-9"})
    publish(settings, "task_started", {}, **args)  # unsigned
    beat = {"worker": "cpu-box-9", "capability": "gpu", "beat": {"kind": "beat"}}  # a cpu token claiming gpu
    other_block = signatures.sign(
        "worker_heartbeat", [], beat, _jti(other["MORAG_WORKER_TOKEN"]), other["MORAG_WORKER_KEY"]
    )
    publish(settings, "worker_heartbeat", {signatures.OPTION: other_block}, **beat)

    own_beat = {"worker": "gpu-box-2", "capability": "gpu", "beat": {"kind": "beat"}}
    old_block = signatures.sign("worker_heartbeat", [], own_beat, token_id, key, time.time() - 3600)
    publish(settings, "worker_heartbeat", {signatures.OPTION: old_block}, **own_beat)  # an old heartbeat

    reasons = wait_for(
        "six rejections",
        lambda: (
            (r := [e["reason"] for e in audit_events(secure) if e["event"] == "message.rejected"])
            and len(r) >= 6
            and r
        ),
    )
    assert sum(r.startswith("bad signature") for r in reasons) == 2  # forged key, and altered
    assert any(r.endswith("refused as a replay") for r in reasons)  # the old heartbeat
    assert any(r == "token of gpu-box-2 used for worker 'cpu-box-9'" for r in reasons)
    assert any(r.startswith("unsigned message") for r in reasons)
    assert any(r == "token is for cpu workers, the message claims gpu" for r in reasons)
    # The good message got through, once; the refused reports are on the task's history.
    state = secure.get(f"/api/v1/tasks/{task['id']}").json()
    assert state["state"] == "running" and state["worker"] == "gpu-box-2"
    events = [e["event"] for e in state["events"]]
    assert events.count("started") == 1
    assert events.count("report rejected") == 4  # forged, altered, other worker's token, unsigned
    assert len(reasons) == 6  # the repeated good message is no rejection: it was applied once

    # An outcome is never refused for its age: a progress report signed an hour ago is applied.
    late = {"task_id": task["id"], "stage": "transcribing", "percent": 42.0, "eta_s": None,
            "worker": "gpu-box-2", "ts": time.time() - 3600}  # fmt: skip
    late_block = signatures.sign("task_progress", [], late, token_id, key, time.time() - 3600)
    publish(settings, "task_progress", {signatures.OPTION: late_block}, **late)
    wait_for(
        "the late progress report",
        lambda: secure.get(f"/api/v1/tasks/{task['id']}").json()["progress"].get("percent") == 42.0,
    )

    revoke = secure.cli("token", "revoke", token_id)
    assert revoke.returncode == 0, revoke.stderr
    publish(settings, "task_started", signed(), **args)
    wait_for(
        "the revocation to bite",
        lambda: any("was revoked" in e.get("reason", "") for e in audit_events(secure)),
    )

    # A block in the old form, carrying the whole token, is refused with the reason.
    whole = {**signed()[signatures.OPTION], "token": token}
    del whole[signatures.TOKEN_ID]
    publish(settings, "task_started", {signatures.OPTION: whole}, **args)
    wait_for(
        "the old block to be refused",
        lambda: any("carries a whole token" in e.get("reason", "") for e in audit_events(secure)),
    )


def _jti(token: str) -> str:
    import jwt

    return jwt.decode(token, options={"verify_signature": False})["jti"]
