"""A task that waits in the queue longer than its transfer grant's lifetime still completes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import Stack, wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

#: The shortest grant lifetime the settings allow (MORAG_GRANT_TTL_S).
GRANT_TTL_S = 60


def test_backlog_longer_than_the_grant_lifetime_completes(stack: Stack, samples: Path) -> None:
    stack.env["MORAG_GRANT_TTL_S"] = str(GRANT_TTL_S)
    stack.start_server()
    proc = stack.cli("submit", "--no-wait", str(samples / "report.html"))
    assert proc.returncode == 0, proc.stderr
    task_id = proc.stdout.split()[0]
    task = stack.get(f"/api/v1/tasks/{task_id}").json()

    # No worker runs while the grant in the task's message expires.
    expired_at = task["created_at"] + GRANT_TTL_S + 2
    time.sleep(max(0.0, expired_at - time.time()))
    assert stack.get(f"/api/v1/tasks/{task_id}").json()["state"] == "queued"

    stack.start_worker("cpu")  # enrolled: its own folder, files over SFTP with the task's grant

    def ended() -> dict | None:
        found = stack.get(f"/api/v1/tasks/{task_id}").json()
        return found if found["state"] in ("done", "failed", "canceled") else None

    final = wait_for("the late task to end", ended, timeout=300, stack=stack)
    assert final["state"] == "done", final.get("error")
    assert final["worker"] == "cpu-worker"
    assert {o["format"] for o in final["outputs"]} == {"md", "json"}
    result = stack.cli("result", task_id)
    assert "# Quarterly ingestion report" in result.stdout, result.stderr
    # The worker reached the file over SFTP with the grant its message carried, expired by then,
    # and gave the grant back once the task ended.
    server_log = [
        line for line in stack.log("server").splitlines() if task_id in line and "cpu-worker" in line
    ]
    assert any('"sftp grant"' in line for line in server_log), stack.log("server")[-4000:]
    wait_for(
        "the worker to release the task's grant",
        lambda: any(
            '"sftp grant released"' in line and task_id in line for line in stack.log("server").splitlines()
        ),
        timeout=30,
        stack=stack,
    )
