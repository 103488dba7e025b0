"""Signed webhooks against a real server: a done, a failed and a canceled task POST their summary,
checked with the snippet of docs/webhooks.md; a failed try is tried again; a pending delivery
survives a server restart; a private callback address is refused at submit."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from pipeline.client import Client, ClientError
from tests.conftest import ROOT, SPOKEN_WORDS, Stack, free_port, open_stack, wait_for
from tests.integration.webhook_receiver import Receiver, doc_snippet

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

#: The receivers are on 127.0.0.1; tries follow each other within a second.
FAST_WEBHOOKS = {
    "MORAG_FETCH_ALLOW_PRIVATE": "true",
    "MORAG_WEBHOOK_BACKOFF_S": "0.2",
    "MORAG_WEBHOOK_BACKOFF_MAX_S": "0.5",
    "MORAG_WEBHOOK_POLL_S": "0.2",
}


@pytest.fixture
def hooks(tmp_path: Path, vhost: str, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A running server whose webhooks may reach 127.0.0.1."""
    with open_stack(tmp_path, vhost, request, env=FAST_WEBHOOKS) as s:
        s.start_server()
        yield s


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def client_of(stack: Stack) -> Client:
    return Client(stack.url, api_key=stack.env["MORAG_API_KEY"])


def doc_verify() -> Callable[[str, bytes, str], bool]:
    """``verify`` as docs/webhooks.md writes it, run as a reader would paste it."""
    space: dict = {}
    exec(doc_snippet(ROOT / "docs" / "webhooks.md", "## Checking the signature"), space)  # noqa: S102
    return space["verify"]


def webhook_of(client: Client, task_id: str, state: str) -> dict:
    """The task's webhook, once it reads ``state``."""

    def found() -> dict | None:
        webhook = client.task(task_id)["webhook"]
        return webhook if webhook and webhook["state"] == state else None

    return wait_for(f"webhook {state}", found)


def waiting_task(client: Client, samples: Path, callback_url: str) -> str:
    """A task that waits for a GPU worker (there is none), with a webhook: canceled, it ends."""
    task = client.submit(samples / "speech.mp3", gpu="require", callback_url=callback_url)
    assert task.record["webhook"]["state"] == "waiting"
    return task.id


def test_ended_tasks_post_a_signed_summary_the_doc_s_snippet_verifies(
    hooks: Stack, receiver: Receiver, samples: Path, corrupt_mp4: Path
) -> None:
    hooks.start_worker("cpu")
    hooks.wait_consumers("cpu")
    with client_of(hooks) as client:
        done = client.submit(samples / "speech.mp3", callback_url=receiver.url)
        failed = client.submit(corrupt_mp4, callback_url=receiver.url)
        canceled = waiting_task(client, samples, receiver.url)
        client.cancel(canceled, "not needed")
        posts = receiver.wait(3, timeout=180)

        secret = hooks.cli("apikey", "webhook-secret", "tests").stdout.strip()
        verify = doc_verify()
        bodies = {}
        for post in posts:
            assert verify(secret, post.body, post.headers["Morag-Signature"])
            assert not verify(secret, post.body + b" ", post.headers["Morag-Signature"])
            body = json.loads(post.body)
            assert post.headers["Morag-Event"] == body["event"] == f"task.{body['state']}"
            bodies[body["task_id"]] = body
        assert {i: b["state"] for i, b in bodies.items()} == {
            done.id: "done", failed.id: "failed", canceled: "canceled"
        }  # fmt: skip
        assert bodies[failed.id]["error"] and bodies[failed.id]["outputs"] == []
        assert bodies[canceled]["error"] == "not needed"
        txt = next(o for o in bodies[done.id]["outputs"] if o["format"] == "txt")
        text = httpx.get(txt["url"], headers=hooks.headers).text.lower()  # the link fetches the result
        assert all(word in text for word in SPOKEN_WORDS)
        assert bodies[done.id]["ended_at"] == client.task(done.id)["finished_at"]

        webhook = webhook_of(client, done.id, "delivered")
        assert (webhook["attempts"], webhook["last_status"]) == (1, 200)
    status = hooks.cli("status", done.id)
    assert f"webhook:  delivered -> {receiver.url} (tries: 1)" in status.stdout


def test_a_receiver_answering_500_then_200_gets_it_delivered_once(hooks: Stack, samples: Path) -> None:
    receiver = Receiver(answers=[500])
    try:
        with client_of(hooks) as client:
            task_id = waiting_task(client, samples, receiver.url)
            client.cancel(task_id)
            webhook = webhook_of(client, task_id, "delivered")
        assert (webhook["attempts"], webhook["last_status"], webhook["last_error"]) == (2, 200, None)
        assert [r.status for r in receiver.received] == [500, 200]
        assert len(receiver.delivered()) == 1
        first, second = receiver.received
        assert first.headers["Morag-Delivery"] == second.headers["Morag-Delivery"]
        assert (first.headers["Morag-Attempt"], second.headers["Morag-Attempt"]) == ("1", "2")
    finally:
        receiver.close()


def test_a_pending_delivery_survives_a_server_restart(hooks: Stack, samples: Path) -> None:
    port = free_port()  # nothing listens there yet: the receiver is down
    with client_of(hooks) as client:
        task_id = waiting_task(client, samples, f"http://127.0.0.1:{port}/hooks/morag")
        client.cancel(task_id)
        failing = wait_for("a failed try", lambda: (client.task(task_id)["webhook"] or {}).get("last_error"))
        assert "ConnectError" in failing
        hooks.stop("server")
        receiver = Receiver(port=port)
        try:
            hooks.start_server()
            [post] = receiver.wait(1)
            webhook = webhook_of(client, task_id, "delivered")
        finally:
            receiver.close()
    assert json.loads(post.body)["task_id"] == task_id
    assert webhook["attempts"] >= 2
    status = hooks.cli("status", task_id)
    assert "webhook:  delivered" in status.stdout


def test_a_private_callback_url_is_refused_at_submit(stack: Stack, samples: Path) -> None:
    """Without MORAG_FETCH_ALLOW_PRIVATE, a callback to a loopback address makes no task."""
    stack.start_server()
    with client_of(stack) as client:
        with pytest.raises(ClientError) as refused:
            client.submit(samples / "speech.mp3", callback_url="http://127.0.0.1:9/hooks")
        assert refused.value.status == 400
        assert "callback_url: 127.0.0.1 resolves to a private address" in str(refused.value)
        assert "MORAG_FETCH_ALLOW_PRIVATE" in str(refused.value)
        with pytest.raises(ClientError) as bad_scheme:
            client.submit(samples / "speech.mp3", callback_url="ftp://example.org/hooks")
        assert bad_scheme.value.status == 400 and "only http and https" in str(bad_scheme.value)
        cli = stack.cli("submit", "--callback-url", "http://localhost:9/hooks", str(samples / "speech.mp3"))
        assert cli.returncode == 2
        assert "refused: callback_url: localhost resolves to a private address" in cli.stderr
        assert sum(client.tasks()["counts"].values()) == 0
