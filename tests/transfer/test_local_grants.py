"""A worker that shares the server's disk reaches a task's files only through the task's transfer
grant, under the rules the SFTP server holds enrolled workers to: signed by the server, of the
task its message names, of the worker's queue (or of a task rerouted to it), while the task is
queued or running; and then only that task's input to read and its output folder to write."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import FileAccess, Settings
from pipeline.errors import AccessRefused, BadInput, TaskEnded, TransferError, UnprovenMessage
from pipeline.jobs import authorize_job, run_job
from pipeline.security.grants import issue_grant
from pipeline.store import State, Task, TaskStore
from pipeline.transfer.checksums import FileRef
from pipeline.transfer.local import LocalStore, LocalTransport, capability_of
from tests.conftest import wait_for
from tests.transfer.conftest import SERVER_SECRET, put_input

SECRET = SERVER_SECRET


@pytest.fixture
def server_settings(tmp_path: Path) -> Settings:
    """The server's settings, which a worker on its host runs with; fast pauses between presentations."""
    return Settings(
        data_dir=tmp_path / "server",
        secret_key=SECRET.decode(),
        file_access=FileAccess.shared,
        worker_name="local-cpu",
        sftp_attempts=3,
        sftp_backoff_s=0.01,
        sftp_max_backoff_s=0.02,
    )


@pytest.fixture
def workers(server_settings: Settings) -> Iterator[Any]:
    """Makes the transport of a worker on the server's host: ``workers(capability)``."""
    made: list[LocalTransport] = []

    def make(capability: str | None) -> LocalTransport:
        made.append(LocalTransport.from_settings(server_settings, capability))
        return made[-1]

    yield make
    for transport in made:
        transport.close()


def new_task(tasks: TaskStore, files: LocalStore, task_id: str, queue: str, content: bytes) -> FileRef:
    """A queued task routed to ``queue``, with its input in the store, as a submit leaves it."""
    ref = put_input(files, task_id, "notes.md", content)
    tasks.create(Task(task_id, "convert", State.queued, "notes.md", ref.to_dict(), {}, {"queue": queue}))
    return ref


def grant(files: LocalStore, task_id: str, queue: str = "cpu", secret: bytes = SECRET) -> str:
    """The grant the server signs into the task's message when it publishes it to ``queue``."""
    return issue_grant(secret, task_id, [files.input_path(task_id, "notes.md")], 600, queue)


def snapshot(files: LocalStore) -> dict[str, str]:
    """Every file of the store and its SHA-256."""
    return {
        path.relative_to(files.root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(files.root.rglob("*"))
        if path.is_file()
    }


def test_a_grant_opens_its_task_and_nothing_else(
    workers: Any, tasks: TaskStore, files: LocalStore, tmp_path: Path
) -> None:
    mine = new_task(tasks, files, "task-a", "cpu", b"# mine\n")
    theirs = new_task(tasks, files, "task-b", "cpu", b"# theirs\n")
    worker = workers("cpu")
    with pytest.raises(AccessRefused, match="holds no transfer grant of task task-a"):
        worker.download(mine, tmp_path / "x")  # no grant yet: nothing is reachable

    worker.authorize("task-a", grant(files, "task-a"))
    assert worker.download(mine, tmp_path / "mine").read_bytes() == b"# mine\n"
    assert worker.read_small("tasks/task-a/output/manifest.json") is None
    (tmp_path / "out.md").write_text("converted")
    files.check(worker.upload(tmp_path / "out.md", files.output_path("task-a", "notes.md")))

    before = snapshot(files)
    with pytest.raises(AccessRefused, match="task-b/input/notes.md: refused to read it: this worker"):
        worker.download(theirs, tmp_path / "theirs")  # another task's input
    with pytest.raises(AccessRefused, match="task-b/output/notes.md: refused to write it"):
        worker.upload(tmp_path / "out.md", files.output_path("task-b", "notes.md"))  # its outputs
    with pytest.raises(AccessRefused, match="read it: this worker holds no transfer grant of task task-b"):
        worker.download(  # out of its own task by `..`: judged by where the path leads
            FileRef("tasks/task-a/output/../../task-b/input/notes.md", theirs.sha256, theirs.size),
            tmp_path / "y",
        )
    with pytest.raises(AccessRefused, match="grant of task task-a does not let a worker write it"):
        worker.upload(tmp_path / "out.md", files.input_path("task-a", "notes.md"))  # inputs are read-only
    with pytest.raises(AccessRefused, match="it is no task's file"):
        worker.read_small("tasks.db-wal")
    with pytest.raises(BadInput, match="leaves the store"):
        worker.read_small("../tasks.db")
    assert snapshot(files) == before
    assert not (tmp_path / "theirs").exists()

    worker.forget("task-a")  # the attempt ended: its grant opens nothing any more
    with pytest.raises(AccessRefused, match="holds no transfer grant of task task-a"):
        worker.download(mine, tmp_path / "again")


def test_a_link_inside_a_granted_task_reaches_nothing_else(
    workers: Any, tasks: TaskStore, files: LocalStore, tmp_path: Path
) -> None:
    new_task(tasks, files, "task-a", "cpu", b"# mine\n")
    theirs = new_task(tasks, files, "task-b", "cpu", b"# theirs\n")
    link = files.resolve("tasks/task-a/input/link.md")
    link.symlink_to(files.resolve(theirs.path))
    worker = workers("cpu")
    worker.authorize("task-a", grant(files, "task-a"))
    with pytest.raises(BadInput, match="passes through a symbolic link"):
        worker.download(FileRef("tasks/task-a/input/link.md", theirs.sha256, theirs.size), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_forged_task_messages_fetch_nothing_and_write_nothing(
    workers: Any, tasks: TaskStore, files: LocalStore, server_settings: Settings, tmp_path: Path
) -> None:
    """Messages of the right shape, for a task of their own, pointing at another task's input: with
    no grant, with a grant signed by another secret, with the genuine grant of the task they point
    at. The worker runs none of them: it fetches nothing, writes nothing, and the task they point
    at is as it was."""
    victim = new_task(tasks, files, "victim", "cpu", b"# a private document\n")
    before, record = snapshot(files), tasks.get("victim")

    def forged(task_id: str, with_grant: str | None) -> dict[str, Any]:
        job = {
            "task_id": task_id,
            "kind": "convert",
            "filename": "notes.md",
            "input": victim.to_dict(),
            "media": {"format": "md"},
            "options": {},
            "route": {"queue": "cpu", "gpu": "prefer"},
        }
        return {**job, "grant": with_grant} if with_grant is not None else job

    cases = [
        (forged("forged-1", None), "task forged-1: the message carries no transfer grant"),
        (forged("forged-2", grant(files, "forged-2", secret=b"x" * 48)), "invalid transfer grant"),
        (forged("forged-3", grant(files, "victim")), "grant of task victim does not open task forged-3"),
    ]
    for job, refusal in cases:
        worker = workers("cpu")
        with pytest.raises(UnprovenMessage, match=refusal):
            authorize_job(worker, job)
        # Run regardless, the job reaches nothing: its transport holds no grant that opens a file.
        with pytest.raises(AccessRefused, match="refused to read it"):
            run_job(job, settings=server_settings, transport=worker, events=_Events())
        # Nor can its transport be made to fetch the input by hand.
        with pytest.raises(AccessRefused, match="victim/input/notes.md: refused to read it"):
            worker.download(victim, tmp_path / "stolen")
    assert snapshot(files) == before
    assert not files.task_dir("forged-1").exists() and not files.task_dir("forged-3").exists()
    after = tasks.get("victim")
    assert (after.state, after.events, after.outputs) == (record.state, record.events, record.outputs)


def test_a_cpu_worker_cannot_take_a_gpu_tasks_grant_until_the_task_is_rerouted(
    workers: Any, tasks: TaskStore, files: LocalStore, tmp_path: Path
) -> None:
    ref = new_task(tasks, files, "on-gpu", "gpu", b"# gpu task\n")
    cpu = workers("cpu")
    refusal = r"transfer grant of task on-gpu is for gpu workers, not cpu \(the task is routed to gpu\)"
    # While the task is open the refusal may be a reroute not yet recorded: the worker presents the
    # grant again before touching the task's files, then gives up with the reason.
    cpu.authorize("on-gpu", grant(files, "on-gpu", "gpu"))
    with pytest.raises(TransferError, match=rf"on-gpu/input/notes.md: .* after 3 attempts: {refusal}"):
        cpu.download(ref, tmp_path / "stolen")
    (tmp_path / "out.md").write_text("forged")
    with pytest.raises(AccessRefused, match="holds no transfer grant of task on-gpu"):
        cpu.upload(tmp_path / "out.md", files.output_path("on-gpu", "notes.md"))
    assert not files.resolve(files.output_path("on-gpu", "notes.md")).exists()
    assert not (tmp_path / "stolen").exists()

    gpu = workers("gpu")  # the workers it was issued to
    gpu.authorize("on-gpu", grant(files, "on-gpu", "gpu"))
    assert gpu.download(ref, tmp_path / "in.md").read_bytes() == b"# gpu task\n"

    # The sweep moves it to the CPU queue, message, grant and all: now the CPU worker is served,
    # and a GPU worker may no longer present a grant of the CPU queue's task.
    assert tasks.reroute([("on-gpu", "gpu", "cpu", "no GPU worker is connected")], by="sweep") == 1
    cpu.authorize("on-gpu", grant(files, "on-gpu", "gpu"))
    assert cpu.download(ref, tmp_path / "moved.md").read_bytes() == b"# gpu task\n"
    files.check(cpu.upload(tmp_path / "out.md", files.output_path("on-gpu", "notes.md")))
    cpu_task = new_task(tasks, files, "cpu-task", "cpu", b"# cpu task\n")
    gpu.authorize("cpu-task", grant(files, "cpu-task", "cpu"))
    with pytest.raises(TransferError, match=r"is for cpu workers, not gpu \(the task is routed to cpu\)"):
        gpu.download(cpu_task, tmp_path / "other.md")

    # A GPU grant of a task the server does not know opens nothing to a CPU worker, for good.
    put_input(files, "unknown", "notes.md", b"# ?\n")
    with pytest.raises(AccessRefused, match="routed to no queue the server knows"):
        cpu.authorize("unknown", grant(files, "unknown", "gpu"))
    # A worker of both queues (`morag-pipeline run`'s) takes either queue's grants.
    both = workers(None)
    both.authorize("on-gpu", grant(files, "on-gpu", "gpu"))
    assert both.download(ref, tmp_path / "both.md").read_bytes() == b"# gpu task\n"


def test_a_cpu_worker_is_served_when_the_move_is_recorded_a_moment_late(
    workers: Any, tasks: TaskStore, files: LocalStore, tmp_path: Path
) -> None:
    """A GPU worker's fallback moves the message to cpu and reports the move; the CPU worker takes
    the copy before the server recorded it, and is served once the store routes the task to it."""
    ref = new_task(tasks, files, "fell-back", "gpu", b"# fell back\n")
    cpu = workers("cpu")
    recorded: list[int] = []

    def pause_while_the_report_lands(seconds: float) -> None:
        if not recorded:
            recorded.append(tasks.reroute([("fell-back", "gpu", "cpu", "GPU failed")], by="gpu-box"))

    cpu.sleep = pause_while_the_report_lands
    cpu.authorize("fell-back", grant(files, "fell-back", "gpu"))
    assert cpu.download(ref, tmp_path / "in.md").read_bytes() == b"# fell back\n"
    assert recorded == [1]


def test_a_grant_of_a_task_that_ended_is_refused_with_task_ended(
    workers: Any, tasks: TaskStore, files: LocalStore, tmp_path: Path
) -> None:
    new_task(tasks, files, "finished", "cpu", b"# done\n")
    assert tasks.mark_done("finished", [], {}, "local-cpu")
    worker = workers("cpu")
    with pytest.raises(TaskEnded, match=r"task finished has ended \(done\)"):
        worker.authorize("finished", grant(files, "finished"))

    # A task canceled while its worker holds the grant: its next use is refused (an open state
    # is reused for a moment, as on the SFTP server), and the closed grant opens nothing after.
    ref = new_task(tasks, files, "canceled", "cpu", b"# canceled\n")
    worker.authorize("canceled", grant(files, "canceled"))
    assert worker.download(ref, tmp_path / "in.md").read_bytes() == b"# canceled\n"
    assert tasks.mark_canceled("canceled", "canceled by its user")

    def refused() -> TaskEnded | None:
        try:
            worker.read_small("tasks/canceled/output/.manifest.json")
        except TaskEnded as exc:
            return exc
        return None

    ended = wait_for("the canceled task's grant to close", refused, timeout=30)
    assert "output/.manifest.json: refused to read it: task canceled has ended (canceled)" in str(ended)
    (tmp_path / "out.md").write_text("too late")
    with pytest.raises(AccessRefused, match="holds no transfer grant of task canceled"):
        worker.upload(tmp_path / "out.md", files.output_path("canceled", "notes.md"))
    assert not files.resolve("tasks/canceled/output").exists()


def test_the_capability_is_the_one_task_queue_a_worker_consumes() -> None:
    assert capability_of(["cpu", "cpu.DQ"]) == "cpu"
    assert capability_of(["gpu", "gpu.DQ", "control"]) == "gpu"
    assert capability_of(["gpu", "cpu", "control", "cpu.DQ", "gpu.DQ"]) is None  # `run`'s worker: both
    assert capability_of(["control"]) is None


class _Events:
    def progress(self, task_id: str, stage: str, percent: float) -> None:
        pass
