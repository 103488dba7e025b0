"""Dead letters show no credential: no grant, no token, no signature block, no password (real server)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import dramatiq
import httpx
import pika
import pytest

from pipeline.brokers import deadletters as dead
from pipeline.brokers.rabbitmq import build_rabbitmq_broker
from pipeline.config import Settings
from pipeline.security import signatures
from pipeline.task_message import job_of
from tests.conftest import Stack

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def take_task_message(amqp_url: str) -> dramatiq.Message:
    """The one task message waiting in ``gpu`` or ``cpu`` (no worker runs), taken off its queue."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        for queue in ("gpu", "cpu"):
            method, _, body = channel.basic_get(queue, auto_ack=True)
            if method is not None:
                return dramatiq.Message.decode(body)
    finally:
        connection.close()
    raise AssertionError("no task message in gpu or cpu")


def test_readonly_key_sees_no_grant_token_or_password_in_dead_letters(stack: Stack, samples: Path) -> None:
    stack.start_server()
    bundle = stack.enroll("gpu-box-5", "gpu")
    token, key = bundle["MORAG_WORKER_TOKEN"], bundle["MORAG_WORKER_KEY"]
    readonly = stack.cli("apikey", "create", "--name", "auditor", "--role", "readonly")
    assert readonly.returncode == 0, readonly.stderr
    reader = {"Authorization": f"Bearer {readonly.stdout.strip().splitlines()[-1]}"}
    with (samples / "speech.mp3").open("rb") as f:
        task = stack.post("/api/v1/tasks", files={"file": ("speech.mp3", f)}).json()

    # The task's message, with its transfer grant, dead in its queue's dead letters; a report signed
    # in the old form (with the whole token), dead in control's, its traceback naming a broker URL.
    message = take_task_message(stack.env["MORAG_BROKER_URL"])
    grant = job_of(message)["grant"]
    assert grant.count(".") == 2
    password_url = "amqp://worker:pa55-in-url@broker:5672/%2F"
    report = {"task_id": task["id"], "attempt": 1, "worker": "gpu-box-5", "ts": time.time()}
    block = signatures.sign("task_started", [], report, "id-of-the-token", key)
    old_block = {**block, "token": token}
    broker = build_rabbitmq_broker(Settings(broker_url=stack.env["MORAG_BROKER_URL"]))
    try:
        record = {"reason": f"poison (token {token})", "at": time.time(), "worker": "gpu-box-5"}
        broker.enqueue(
            message.copy(
                queue_name=f"{message.queue_name}.XQ",
                options={"dead_letter": record, "traceback": f"to {password_url}"},
            )
        )
        signed_report = dramatiq.Message(
            "control.XQ", "task_started", (), report, {signatures.OPTION: old_block,
            "dead_letter": {"reason": "bad", "at": time.time()}, "traceback": f"at {password_url}"},
        )  # fmt: skip
        broker.enqueue(signed_report)
    finally:
        broker.close()

    secrets = [token, key, grant, "pa55-in-url", block["mac"]]
    for headers in (reader, stack.headers):  # a readonly key, and the admin too
        listing = httpx.get(f"{stack.url}/api/v1/dead", headers=headers)
        assert listing.status_code == 200, listing.text
        ids = {x["message_id"] for x in listing.json()["letters"]}
        assert ids == {message.message_id, signed_report.message_id}
        shown = httpx.get(f"{stack.url}/api/v1/dead/{task['id']}", headers=headers)
        assert shown.status_code == 200, shown.text
        shown_report = httpx.get(f"{stack.url}/api/v1/dead/{signed_report.message_id}", headers=headers)
        assert shown_report.status_code == 200, shown_report.text
        for text in (listing.text, shown.text, shown_report.text):
            assert not [s for s in secrets if s in text], text
        assert shown_report.json()["letters"][0]["options"][signatures.OPTION] == dead.REDACTED
        [task_letter] = shown.json()["letters"]
        # What a reader needs is still there; the credentials are marked as hidden.
        assert task_letter["body"]["kwargs"]["job"]["task_id"] == task["id"]
        assert task_letter["body"]["kwargs"]["job"]["grant"] == dead.REDACTED
        assert task_letter["traceback"] == "to amqp://worker:[redacted]@broker:5672/%2F"
        assert task_letter["reason"] == "poison (token [redacted])"

    # The CLI, with the readonly key, shows none either.
    cli = stack.cli("dead", "show", task["id"], "--json", MORAG_API_KEY=reader["Authorization"][7:])
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout) and not [s for s in secrets if s in cli.stdout + cli.stderr]

    # A retry sends the message as it was: with a grant the worker can use.
    retried = stack.post("/api/v1/dead/retry", json={"ids": [task["id"]], "queue": message.queue_name})
    assert retried.status_code == 200 and len(retried.json()["retried"]) == 1, retried.text
    again = take_task_message(stack.env["MORAG_BROKER_URL"])
    assert job_of(again)["grant"].count(".") == 2
