"""Version skew during a rolling upgrade: a worker of the previous release and this server, this
worker and a server of the previous release, and messages in a schema newer than the reader reads.

The previous release is taken from the repository's history (``PREVIOUS_RELEASE``, the last
commit before task and ``control`` messages named their schema) and run from an exported tree on
``PYTHONPATH``, with this checkout's dependencies. See docs/failures.md, "Upgrades".
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import dramatiq
import pytest
from pydantic import SecretStr

from pipeline import control
from pipeline.brokers.rabbitmq import build_rabbitmq_broker
from pipeline.config import Settings
from pipeline.services import build_services
from pipeline.submission import grant_for
from pipeline.task_message import JOB_SCHEMA, build_job
from tests.chaos.test_every_task_ends import record_unpublished
from tests.conftest import ROOT, Stack, open_stack, wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

#: The release before schemas: its workers send reports without one and read jobs without one.
PREVIOUS_RELEASE = "2c2166b"


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The previous release's ``pipeline`` package, exported from the repository's history."""
    if (
        not shutil.which("git")
        or subprocess.run(
            ["git", "-C", str(ROOT), "cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}"], capture_output=True
        ).returncode
    ):
        pytest.skip(
            f"the previous release ({PREVIOUS_RELEASE}) is not in this clone's history (a shallow clone)"
        )
    folder = tmp_path_factory.mktemp("previous-release")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", PREVIOUS_RELEASE, "pipeline"],
                             capture_output=True, check=True).stdout  # fmt: skip
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    yield folder


def submit_document(stack: Stack, samples: Path) -> dict:
    proc = stack.cli("submit", "--json", str(samples / "report.html"), timeout=240)
    assert proc.returncode == 0, proc.stderr + stack.all_logs()
    return json.loads(proc.stdout)


def test_a_worker_of_the_previous_release_works_for_this_server(
    stack: Stack, samples: Path, previous_release: Path
) -> None:
    stack.start_server()
    stack.start_worker("cpu", "old-worker", PYTHONPATH=str(previous_release))
    stack.wait_consumers("cpu")
    task = submit_document(stack, samples)
    assert task["state"] == "done" and task["worker"].startswith("old-worker")
    assert "report rejected" not in [
        e["event"] for e in stack.get(f"/api/v1/tasks/{task['id']}").json()["events"]
    ]


def test_this_worker_works_for_a_server_of_the_previous_release(
    tmp_path: Path, vhost: str, request: pytest.FixtureRequest, samples: Path, previous_release: Path
) -> None:
    # The server's host runs the previous release throughout (its store, its admin commands).
    with open_stack(tmp_path, vhost, request, env={"PYTHONPATH": str(previous_release)}) as stack:
        stack.start_server()
        stack.start_worker("cpu", "new-worker")  # enrolled by the old server; runs this checkout
        stack.wait_consumers("cpu")
        task = submit_document(stack, samples)
        assert task["state"] == "done" and task["worker"].startswith("new-worker")


def _in_process(stack: Stack) -> Settings:
    """The server's settings, for publishing as the server (or a worker on its host) would."""
    return Settings(
        data_dir=stack.data_dir, secret_key=SecretStr(stack.env["MORAG_SECRET_KEY"]),
        broker_url=SecretStr(stack.env["MORAG_BROKER_URL"]), file_access="shared",
    )  # fmt: skip


def test_a_job_newer_than_the_worker_reads_fails_with_the_reason_and_is_kept(
    stack: Stack, samples: Path
) -> None:
    stack.start_server()
    stack.start_worker("cpu", "local-cpu", enroll=False, MORAG_FILE_ACCESS="shared")
    stack.wait_consumers("cpu")
    settings = _in_process(stack)
    services = build_services(settings)
    task = record_unpublished(stack, samples / "report.html")
    job = {**build_job(task, grant_for(services, task.id, task.input["path"])), "schema": 99}
    broker = build_rabbitmq_broker(settings)
    try:
        services.store.mark_published(task.id, "crafted", "cpu", by="test")
        broker.enqueue(dramatiq.Message(queue_name="cpu", actor_name="convert_document", args=(),
                                        kwargs={"job": job}, options={}))  # fmt: skip
    finally:
        broker.close()
    failed = wait_for(
        "the task failed",
        lambda: (t := stack.get(f"/api/v1/tasks/{task.id}").json())["state"] == "failed" and t,
        120,
        stack,
    )
    assert f"schema 99, newer than this release reads ({JOB_SCHEMA}): upgrade this worker" in failed["error"]
    letters = stack.get("/api/v1/dead").json()
    assert task.id in str(letters), letters  # kept, to be retried once the worker is upgraded


def test_a_report_newer_than_the_server_reads_is_refused_with_the_reason(stack: Stack, samples: Path) -> None:
    stack.start_server()
    settings = _in_process(stack)
    task = record_unpublished(stack, samples / "report.html")
    broker = build_rabbitmq_broker(settings)
    try:
        note = control.report(control.TASK_NOTE, task_id=task.id, event="from the future", detail={},
                              worker="future-worker")  # fmt: skip
        note.options[control.SCHEMA_OPTION] = 2
        broker.enqueue(note)
        # The same report in this schema, with a field this release does not know, is applied.
        later = control.report(control.TASK_NOTE, task_id=task.id, event="with a new field", detail={},
                               worker="future-worker", added_in_a_later_release=True)  # fmt: skip
        broker.enqueue(later)
    finally:
        broker.close()

    def events() -> list[dict]:
        return stack.get(f"/api/v1/tasks/{task.id}").json()["events"]

    handled = {"report rejected", "with a new field"}
    wait_for("both reports handled", lambda: handled <= {e["event"] for e in events()}, 60, stack)
    [rejected] = [e for e in events() if e["event"] == "report rejected"]
    assert "schema 2, newer than this release reads (1): upgrade the server" in rejected["detail"]["reason"]
    assert "from the future" not in [e["event"] for e in events()]
    # The server lists the refused sender, with the reason.
    workers = stack.cli("workers", "--json")
    assert "upgrade the server" in workers.stdout, workers.stdout + workers.stderr
