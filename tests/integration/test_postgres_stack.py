"""The whole stack with its task store on PostgreSQL: server, CLI and a CPU worker, as users run them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.store import State, TaskStore
from tests.conftest import open_stack

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow, pytest.mark.postgresql]


def test_a_document_task_runs_end_to_end_with_the_task_store_on_postgresql(
    tmp_path: Path, vhost: str, postgres_url: str, samples: Path, request: pytest.FixtureRequest
) -> None:
    with open_stack(tmp_path, vhost, request, env={"MORAG_DATABASE_URL": postgres_url}) as stack:
        stack.start_server()
        stack.start_worker("cpu")
        stack.wait_consumers("cpu")

        proc = stack.cli("submit", "--json", str(samples / "report.html"))

        assert proc.returncode == 0, proc.stderr
        task = json.loads(proc.stdout)
        task = task[0] if isinstance(task, list) else task
        assert task["state"] == "done", task.get("error")
        assert "# Quarterly ingestion report" in task["text"]
        assert task["worker"] == "cpu-worker"
        status = stack.cli("status", "--json", task["id"])
        assert json.loads(status.stdout)["state"] == "done"
        stored = TaskStore(postgres_url).get(task["id"])
        assert stored.state is State.done
        assert [e["event"] for e in stored.events][0] == "submitted"
        assert not (stack.data_dir / "tasks.db").exists()  # no SQLite file beside it
