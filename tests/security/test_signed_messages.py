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
from tests.conftest import SPOKEN_WORDS, Stack, wait_for

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
    """A server out of development mode, with a client API key."""
    stack.env["MORAG_DEV_MODE"] = "false"
    key = stack.cli("apikey", "create", "--name", "tests", "--role", "admin")
    assert key.returncode == 0, key.stderr
    stack.env["MORAG_API_KEY"] = key.stdout.strip()
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


def test_unenrolled_worker_is_ignored(secure: Stack, samples: Path) -> None:
    secure.start_worker("gpu", name="rogue", enroll=False, MORAG_FILE_ACCESS="shared")  # no token
    secure.wait_consumers("gpu")
    proc = secure.cli("submit", "--no-wait", str(samples / "speech.mp3"))
    task_id = proc.stdout.strip()
    rejected = wait_for(
        "a rejection", lambda: [e for e in audit_events(secure) if e["event"] == "message.rejected"]
    )
    assert rejected[0]["reason"] == "unsigned message" and rejected[0]["worker"] == "rogue"
    headers = {"Authorization": f"Bearer {secure.env['MORAG_API_KEY']}"}
    time.sleep(2)
    task = httpx.get(f"{secure.url}/api/v1/tasks/{task_id}", headers=headers).json()
    assert task["state"] == "queued" and task["worker"] is None
    # Its heartbeats were refused too: the registry never counts it, so nothing is routed to it.
    listed = httpx.get(f"{secure.url}/api/v1/workers", headers=headers).json()["workers"]
    assert "rogue" not in [w["id"] for w in listed]


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
        block = signatures.sign("task_started", [], {**args, **kwargs}, token, token_id, with_key, now)
        return {signatures.OPTION: block}

    good = signed()
    publish(settings, "task_started", good, **args)
    publish(settings, "task_started", good, **args)  # the same message again: a replay
    publish(settings, "task_started", signed(with_key="0" * 64), **args)  # forged key
    publish(settings, "task_started", signed(now=time.time() - 3600), **args)  # too old
    tampered = signed()
    publish(settings, "task_started", tampered, **{**args, "attempt": 7})  # altered after signing
    publish(settings, "task_started", signed(worker="cpu-box-9"), **{**args, "worker": "cpu-box-9"})
    publish(settings, "task_started", {}, **args)  # unsigned
    beat = {"worker": "cpu-box-9", "capability": "gpu", "beat": {"kind": "beat"}}  # a cpu token claiming gpu
    other_block = signatures.sign(
        "worker_heartbeat", [], beat, other["MORAG_WORKER_TOKEN"], _jti(other["MORAG_WORKER_TOKEN"]),
        other["MORAG_WORKER_KEY"],
    )  # fmt: skip
    publish(settings, "worker_heartbeat", {signatures.OPTION: other_block}, **beat)

    reasons = wait_for(
        "seven rejections",
        lambda: (
            (r := [e["reason"] for e in audit_events(secure) if e["event"] == "message.rejected"])
            and len(r) >= 7
            and r
        ),
    )
    assert any(r.startswith("replayed message") for r in reasons)
    assert any(r.startswith("bad signature") for r in reasons)  # forged key, and altered
    assert sum(r.startswith("bad signature") for r in reasons) == 2
    assert any(r.endswith("refused as a replay") for r in reasons)  # too old
    assert any(r == "token of gpu-box-2 used for worker 'cpu-box-9'" for r in reasons)
    assert "unsigned message" in reasons
    assert any(r == "token is for cpu workers, the message claims gpu" for r in reasons)
    # The one good message got through.
    state = httpx.get(f"{secure.url}/api/v1/tasks/{task['id']}", headers=headers).json()
    assert state["state"] == "running" and state["worker"] == "gpu-box-2"

    revoke = secure.cli("token", "revoke", token_id)
    assert revoke.returncode == 0, revoke.stderr
    publish(settings, "task_started", signed(), **args)
    wait_for(
        "the revocation to bite",
        lambda: any("was revoked" in e.get("reason", "") for e in audit_events(secure)),
    )


def _jti(token: str) -> str:
    import jwt

    return jwt.decode(token, options={"verify_signature": False})["jti"]
