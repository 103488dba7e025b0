"""The daily upload quota of an API key is kept in the task store: a restarted server still counts
what the key uploaded today, and refuses it past its quota; other keys keep their own."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from fastapi import HTTPException

from pipeline.api.uploads import DailyQuota
from pipeline.store import TaskStore
from tests.conftest import Stack

KIB = 1024
MIB = 1024 * KIB
REFUSED = (
    "over the daily upload quota of 1 MiB for this API key (MORAG_QUOTA_MB_PER_DAY);"
    " it renews at midnight UTC"
)


def notes(kib: int) -> bytes:
    """A Markdown document of ``kib`` KiB."""
    return b"# Notes\n" + b"w" * (kib * KIB - 8)


def client_key(stack: Stack, name: str) -> str:
    created = stack.cli("apikey", "create", "--name", name, "--role", "client")
    assert created.returncode == 0, created.stderr
    return created.stdout.strip().splitlines()[-1]


def upload(stack: Stack, key: str, name: str, content: bytes) -> httpx.Response:
    return httpx.post(
        f"{stack.url}/api/v1/tasks",
        files={"file": (name, content)},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )


def restart(stack: Stack) -> None:
    stack.stop("server")
    stack.start_server()


def test_a_restarted_server_still_counts_todays_uploads_of_each_key(stack: Stack) -> None:
    stack.env["MORAG_QUOTA_MB_PER_DAY"] = "1"
    uploader, other = client_key(stack, "uploader"), client_key(stack, "other")
    stack.start_server()
    assert upload(stack, uploader, "a.md", notes(600)).status_code == 201

    restart(stack)
    # 600 KiB of 1 MiB were counted before the restart: another 600 KiB is cut off as it streams in.
    over = upload(stack, uploader, "b.md", notes(600))
    assert over.status_code == 429, over.text
    assert over.json()["detail"] == f"b.md: {REFUSED}"
    assert upload(stack, uploader, "c.md", notes(424)).status_code == 201  # the 424 KiB left still pass
    spent = upload(stack, uploader, "d.md", notes(1))
    assert spent.status_code == 429, spent.text
    assert spent.json()["detail"] == REFUSED

    restart(stack)
    spent = upload(stack, uploader, "e.md", notes(1))
    assert spent.status_code == 429, spent.text
    assert spent.json()["detail"] == REFUSED
    # Another key has its own quota, untouched by the first key's uploads.
    assert upload(stack, other, "f.md", notes(600)).status_code == 201
    assert upload(stack, other, "g.md", notes(424)).status_code == 201
    assert upload(stack, other, "h.md", notes(1)).status_code == 429
    tasks = stack.get("/api/v1/tasks").json()["tasks"]
    assert sorted(task["filename"] for task in tasks) == ["a.md", "c.md", "f.md", "g.md"]


def test_the_quota_renews_at_midnight_utc(tmp_path: Path) -> None:
    now = [datetime(2025, 3, 1, 23, 59, tzinfo=UTC).timestamp()]
    store = TaskStore(tmp_path / "tasks.db")
    DailyQuota(MIB, store, clock=lambda: now[0]).charge("k1", MIB)
    # Counted in the store: a new server process (a new DailyQuota) refuses the key the same day.
    with pytest.raises(HTTPException) as refused:
        DailyQuota(MIB, store, clock=lambda: now[0]).left("k1")
    assert (refused.value.status_code, refused.value.detail) == (429, REFUSED)
    now[0] += 60  # midnight UTC
    assert DailyQuota(MIB, store, clock=lambda: now[0]).left("k1") == (MIB, REFUSED)
