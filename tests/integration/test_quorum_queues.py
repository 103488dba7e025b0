"""Quorum queues (MORAG_BROKER_QUEUE_TYPE=quorum) on the real RabbitMQ: tasks run, dead letters
work, and a vhost whose queues are of the other type is refused with one line and the fix."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import dramatiq
import httpx
import pika
import pytest

from pipeline.brokers import QUEUES
from pipeline.brokers import deadletters as dead
from pipeline.brokers.queue_types import cost, parse_version
from pipeline.brokers.rabbitmq import build_rabbitmq_broker
from pipeline.config import QueueType, Settings
from tests.conftest import BIN, ROOT, Stack, make_pdf, management, queue_depth, queue_info, wait_for

pytestmark = pytest.mark.rabbitmq

#: The nine queues of the pipeline's topology; the exclusive and transient ones (morag.server,
#: start marks, the cancellations stream) are not task queues and keep their own type.
TASK_QUEUES = [f"{queue}{suffix}" for queue in QUEUES for suffix in ("", ".DQ", ".XQ")]


def rabbitmq_version() -> str:
    base, auth = management()
    return str(httpx.get(f"{base}/api/overview", auth=auth, timeout=10).json()["rabbitmq_version"])


def task(stack: Stack, task_id: str) -> dict:
    return stack.get(f"/api/v1/tasks/{task_id}", timeout=30).raise_for_status().json()


def submit(stack: Stack, path: Path) -> str:
    with path.open("rb") as f:
        response = stack.post("/api/v1/tasks", files={"file": (path.name, f)}, timeout=120)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def quorum_stack(stack: Stack) -> Stack:
    stack.env["MORAG_BROKER_QUEUE_TYPE"] = "quorum"
    stack.start_server()
    return stack


@pytest.mark.slow
def test_a_document_runs_to_done_on_quorum_queues(stack: Stack, samples: Path) -> None:
    quorum_stack(stack)
    stack.start_worker("cpu")
    # The enrolled box's settings say which queues to declare: it has none of the server's.
    bundle = (stack.data_dir.parent / "worker-cpu-worker" / "morag.env").read_text().splitlines()
    assert "MORAG_BROKER_QUEUE_TYPE=quorum" in bundle
    stack.wait_consumers("cpu")
    task_id = submit(stack, samples / "report.html")
    done = wait_for(
        "the document task", lambda: (t := task(stack, task_id))["state"] == "done" and t, stack=stack
    )
    assert "Quarterly ingestion report" in stack.get(f"/api/v1/tasks/{done['id']}/result").text

    # What the management API shows: every task queue is quorum, dead-lettering at least once.
    url = stack.env["MORAG_BROKER_URL"]
    infos = {name: queue_info(url, name) for name in TASK_QUEUES}
    assert {name: info["type"] for name, info in infos.items()} == dict.fromkeys(TASK_QUEUES, "quorum")
    for name in ("gpu", "cpu", "cpu.DQ", "control"):
        arguments = infos[name]["arguments"]
        assert arguments["x-dead-letter-strategy"] == "at-least-once"
        assert arguments["x-overflow"] == "reject-publish"
        assert "x-max-priority" not in arguments
    # The server said at start what the choice costs on this broker.
    version = rabbitmq_version()
    line = cost(QueueType.quorum, parse_version(version), 10, version)
    assert line in stack.log("server")
    assert line.startswith(f"queues: quorum on RabbitMQ {version}: replicated")


@pytest.mark.slow
def test_a_failed_task_is_dead_lettered_to_cpu_xq_and_retried_after_the_fix(
    stack: Stack, tmp_path: Path
) -> None:
    quorum_stack(stack)
    # A misconfigured CPU worker: its docling models folder is empty, so every PDF fails at once.
    empty = tmp_path / "no-models"
    empty.mkdir()
    stack.start_worker("cpu", MORAG_DOCLING_ARTIFACTS_PATH=str(empty))
    stack.wait_consumers("cpu")
    pdf = tmp_path / "minutes.pdf"
    pdf.write_bytes(make_pdf(["Minutes of the quorum meeting"]))
    task_id = submit(stack, pdf)
    failed = wait_for(
        "the task to fail", lambda: (t := task(stack, task_id))["state"] == "failed" and t, stack=stack
    )
    assert "MORAG_DOCLING_ARTIFACTS_PATH" in failed["error"]
    url = stack.env["MORAG_BROKER_URL"]
    assert queue_depth(url, "cpu.XQ") == 1
    letters = json.loads(stack.cli("dead", "list", "cpu", "--json").stdout)["letters"]
    assert [x["task_id"] for x in letters] == [task_id]

    stack.stop("cpu-worker")
    stack.start_worker("cpu")  # fixed: PDFs go through the text layer
    stack.wait_consumers("cpu")
    retried = stack.cli("dead", "retry", "cpu")
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.strip() == f"retried {task_id} (minutes.pdf) on cpu"
    wait_for("the retried task", lambda: task(stack, task_id)["state"] == "done", stack=stack)
    assert "quorum meeting" in stack.get(f"/api/v1/tasks/{task_id}/result").text
    assert queue_depth(url, "cpu.XQ") == 0


def test_rabbitmq_dead_letters_a_rejected_message_from_a_quorum_queue(vhost: str) -> None:
    """The path without the worker's record: RabbitMQ itself moves the message (at least once)."""
    broker = build_rabbitmq_broker(Settings(broker_url=vhost, broker_queue_type=QueueType.quorum))
    try:
        broker.declare_queue("cpu", ensure=True)
        message = dramatiq.Message("cpu", "convert_document", (), {"job": {"task_id": "t1"}}, {})
        connection = pika.BlockingConnection(pika.URLParameters(vhost))
        channel = connection.channel()
        channel.confirm_delivery()  # the message is in the queue once basic_publish returns
        channel.basic_publish("", "cpu", message.encode(), pika.BasicProperties(delivery_mode=2))
        method, _, _ = channel.basic_get("cpu")
        channel.basic_nack(method.delivery_tag, requeue=False)
        connection.close()
        wait_for("the rejected message in cpu.XQ", lambda: queue_depth(vhost, "cpu.XQ") == 1)
        [letter] = dead.browse(pika.URLParameters(vhost), ["cpu"])
        assert letter.task_id == "t1" and letter.reason == "rejected by a worker: no reason recorded"
        assert queue_depth(vhost, "cpu") == 0
    finally:
        broker.close()


@pytest.mark.slow
def test_a_classic_vhost_refuses_a_quorum_server_and_worker_with_the_fix(stack: Stack) -> None:
    stack.start_server()  # classic queues, as before
    stack.stop("server")
    url = stack.env["MORAG_BROKER_URL"]
    assert queue_info(url, "cpu")["type"] == "classic"

    refused = stack.cli("server", MORAG_BROKER_QUEUE_TYPE="quorum", timeout=60)
    assert refused.returncode == 2
    # One line of reason, besides the structured log lines (JSON) of what started before.
    said = [ln for ln in refused.stderr.splitlines() if ln.strip() and not ln.startswith("{")]
    assert len(said) == 1 and "Traceback" not in refused.stderr, refused.stderr
    line = said[0]
    assert (
        line.startswith("morag-pipeline: queue ")
        and "is a classic queue, but MORAG_BROKER_QUEUE_TYPE=quorum" in line
    )
    assert "delete the vhost's queues" in line and "new vhost" in line

    # A worker declaring its queues hits the same and stops, with the same line and no traceback.
    worker = subprocess.run(
        [
            str(BIN / "dramatiq"),
            "pipeline.actors.cpu",
            "--queues",
            "cpu",
            "--processes",
            "1",
            "--threads",
            "1",
        ],
        env={
            **stack.env,
            "MORAG_BROKER_QUEUE_TYPE": "quorum",
            "MORAG_WORKER_NAME": "cpu-quorum",
            "PYTHONPATH": str(ROOT),
        },
        cwd=stack.data_dir.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = worker.stdout + worker.stderr
    assert worker.returncode == 3, output
    assert (
        "queue cpu in vhost" in output and "is a classic queue, but MORAG_BROKER_QUEUE_TYPE=quorum" in output
    )
    assert "Traceback" not in output
    assert queue_info(url, "cpu")["type"] == "classic"  # nothing was changed
