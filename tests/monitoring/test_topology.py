"""The RabbitMQ definitions of ops/rabbitmq load into a vhost, and the server checks at start that the
broker's topology is what it expects, saying what differs."""

from __future__ import annotations

import json
import time
import urllib.parse
from pathlib import Path

import httpx
import pika
import pytest

from pipeline.security.broker_users import permissions, topic_permissions
from tests.conftest import Stack, management, queue_info

pytestmark = [pytest.mark.rabbitmq]

OPS = Path(__file__).resolve().parents[2] / "ops" / "rabbitmq"


def vhost_of(amqp_url: str) -> str:
    return urllib.parse.urlsplit(amqp_url).path.lstrip("/")  # quoted, as the management API wants it


def load_policies(amqp_url: str) -> list[dict]:
    """ops/rabbitmq/definitions.json's policies, put on the URL's vhost through the management API."""
    base, auth = management()
    policies = json.loads((OPS / "definitions.json").read_text())["policies"]
    for policy in policies:
        body = {k: v for k, v in policy.items() if k not in ("vhost", "name")}
        httpx.put(f"{base}/api/policies/{vhost_of(amqp_url)}/{policy['name']}", json=body, auth=auth,
                  timeout=10).raise_for_status()  # fmt: skip
    return policies


def applied_policy(amqp_url: str, queue: str, timeout: float = 30) -> str | None:
    """The policy the management API shows on ``queue`` (it shows one once its statistics come in)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = queue_info(amqp_url, queue).get("policy")
        if found:
            return found
        time.sleep(0.5)
    return None


def topology_line(stack: Stack, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in stack.log("server").splitlines():
            if "broker topology" in line:
                return json.loads(line)["msg"]
        time.sleep(0.2)
    raise AssertionError(f"no topology line:\n{stack.log('server')}")


def test_the_shipped_policies_apply_and_the_server_finds_the_topology_as_expected(stack: Stack) -> None:
    url = stack.env["MORAG_BROKER_URL"]
    load_policies(url)
    stack.start_server()
    assert topology_line(stack) == "broker topology matches what the server expects"
    assert applied_policy(url, "gpu") == "morag-task-queues"
    assert applied_policy(url, "control") == "morag-control"
    assert applied_policy(url, "gpu.XQ") == "morag-dead-letters"


def test_the_server_says_what_differs_in_the_topology(stack: Stack) -> None:
    url = stack.env["MORAG_BROKER_URL"]
    base, auth = management()
    bad = {"pattern": "^gpu$", "apply-to": "queues", "priority": 20, "definition": {"message-ttl": 60000}}
    httpx.put(
        f"{base}/api/policies/{vhost_of(url)}/short-ttl", json=bad, auth=auth, timeout=10
    ).raise_for_status()
    connection = pika.BlockingConnection(pika.URLParameters(url))
    connection.channel().queue_declare("transcribe-old", durable=True)
    connection.close()
    stack.start_server()
    line = topology_line(stack)
    assert line.startswith("broker topology differs from what the server expects: ")
    assert "queue gpu: policy short-ttl sets message-ttl=60000: waiting tasks would leave it unrun" in line
    assert "queue transcribe-old is not one the pipeline uses (0 messages, 0 consumers)" in line
    assert "queue cpu" not in line  # what matches is not named


def test_the_users_template_grants_what_token_issue_grants() -> None:
    template = json.loads((OPS / "users.template.json").read_text())
    worker = next(p for p in template["permissions"] if p["user"] == "${MORAG_WORKER}")
    assert {k: worker[k] for k in ("configure", "write", "read")} == permissions("gpu")
    topic = template["topic_permissions"][0]
    assert {k: topic[k] for k in ("exchange", "write", "read")} == topic_permissions("gpu")
