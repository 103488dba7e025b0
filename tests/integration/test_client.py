"""``pipeline.client`` against a real server and worker: submit, wait, result and cancel (sync and
asyncio), idempotent submits, retried 429 and 503, and the event stream resumed after a cut."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pipeline.client import AsyncClient, Client
from tests.conftest import SPOKEN_WORDS, Stack
from tests.integration.answering_proxy import AnsweringProxy

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


@pytest.fixture
def running(stack: Stack) -> Stack:
    """The server and one CPU worker: transcriptions go to ``cpu`` (no GPU worker is live)."""
    stack.start_server()
    stack.start_worker("cpu")
    stack.wait_consumers("cpu")
    return stack


@pytest.fixture
def client(running: Stack) -> Iterator[Client]:
    with Client(running.url, api_key=running.env["MORAG_API_KEY"]) as c:
        yield c


def test_submit_wait_result_and_cancel(client: Client, samples: Path) -> None:
    seen: list[dict] = []
    task = client.submit(samples / "talk.mp4", language="en")
    final = task.wait(timeout=180, on_progress=seen.append)
    assert final["state"] == "done", final.get("error")
    assert "running" in {r["state"] for r in seen} and seen[-1]["state"] == "done"
    text = task.result("txt").decode().lower()
    assert all(word in text for word in SPOKEN_WORDS)
    assert task.result("srt").decode().startswith("1\n")
    # No GPU worker: a task that requires one waits, and is canceled.
    waiting = client.submit(samples / "speech.mp3", gpu="require")
    assert waiting.status()["state"] == "queued"
    assert waiting.cancel("not needed")["state"] == "canceled"
    assert waiting.wait(timeout=10)["state"] == "canceled"


def test_the_asyncio_client(running: Stack, samples: Path) -> None:
    async def main() -> tuple[dict, bytes, dict]:
        async with AsyncClient(running.url, api_key=running.env["MORAG_API_KEY"]) as client:
            task = await client.submit(samples / "talk.mp4")
            final = await task.wait(timeout=180)
            text = await task.result("txt")
            waiting = await client.submit(samples / "speech.mp3", gpu="require")
            await waiting.cancel()
            return final, text, await waiting.wait(timeout=10)

    final, text, canceled = asyncio.run(main())
    assert final["state"] == "done", final.get("error")
    assert all(word in text.decode().lower() for word in SPOKEN_WORDS)
    assert canceled["state"] == "canceled"


def test_the_same_idempotency_key_makes_one_task(client: Client, running: Stack, samples: Path) -> None:
    key = uuid.uuid4().hex
    first = client.submit(samples / "speech.mp3", idempotency_key=key, gpu="require")
    again = client.submit(samples / "speech.mp3", idempotency_key=key, gpu="require")
    assert again.id == first.id
    raw = httpx.post(
        f"{running.url}/api/v1/tasks", headers={**running.headers, "Idempotency-Key": key},
        files={"file": ("speech.mp3", (samples / "speech.mp3").read_bytes())},
    )  # fmt: skip
    assert raw.status_code == 200 and raw.json()["id"] == first.id
    assert raw.headers["Idempotent-Replayed"] == "true"
    other = client.submit(samples / "speech.mp3", gpu="require")
    assert other.id != first.id
    assert client.tasks()["counts"]["queued"] == 2


def test_a_429_and_a_503_are_retried_and_make_one_task(running: Stack, samples: Path) -> None:
    proxy = AnsweringProxy(running.url, [(429, {"Retry-After": "1"}), (503, {})])
    try:
        with Client(proxy.url, api_key=running.env["MORAG_API_KEY"]) as client:
            task = client.submit(samples / "speech.mp3", gpu="require")
            assert [status for *_, status in proxy.refused] == [429, 503]
            assert proxy.seen[("POST", "/api/v1/tasks")] == 3
            assert client.tasks()["counts"]["queued"] == 1
            assert client.task(task.id)["filename"] == "speech.mp3"
    finally:
        proxy.close()


def test_a_429_without_retry_after_is_not_retried(running: Stack, samples: Path) -> None:
    proxy = AnsweringProxy(running.url, [(429, {})])
    try:
        with (
            Client(proxy.url, api_key=running.env["MORAG_API_KEY"]) as client,
            pytest.raises(Exception) as exc,
        ):
            client.submit(samples / "speech.mp3")
        assert getattr(exc.value, "status", None) == 429
        assert proxy.seen[("POST", "/api/v1/tasks")] == 1
    finally:
        proxy.close()


def test_a_stream_cut_mid_task_and_resumed_misses_no_event(client: Client, samples: Path) -> None:
    task = client.submit(samples / "talk.mp4")
    before: list = []
    for event in client.events([task.id]):
        before.append(event)
        if event.name == "started":
            break  # the connection is closed here, mid-task
    assert before[-1].name == "started", [e.name for e in before]
    after = list(client.events([task.id], last_event_id=before[-1].id, timeout=180))
    assert after and after[-1].name == "done", [e.name for e in after]
    stored = [(e.data["ts"], e.name) for e in before + after if e.name != "progress"]
    record = client.task(task.id)
    assert stored == [(e["ts"], e["event"]) for e in record["events"]]  # each once, in order
    assert any(e.name == "progress" for e in after)  # progress came after the resumption too
    ids = [e.data["id"] for e in before + after if e.name != "progress"]
    assert len(ids) == len(set(ids))


def test_the_cli_follows_the_stream_and_polls_no_more(running: Stack, samples: Path) -> None:
    proxy = AnsweringProxy(running.url)
    try:
        proc = running.cli("submit", "--json", str(samples / "talk.mp4"), MORAG_SERVER_URL=proxy.url)
        assert proc.returncode == 0, proc.stderr
    finally:
        proxy.close()
    task_reads = {path: n for (method, path), n in proxy.seen.items() if method == "GET" and
                  path.startswith("/api/v1/tasks/") and path.count("/") == 4}  # fmt: skip
    assert proxy.seen[("GET", "/api/v1/events")] >= 1
    assert task_reads == {}, proxy.seen  # not one read of the task: its progress came from the stream
