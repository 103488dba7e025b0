"""A transfer grant opens its task only to the workers it was issued to, and only while their token
stands: a CPU worker cannot present a GPU task's grant (until the task is rerouted to the CPU
queue), and a revoked worker is cut off in mid-transfer and cannot log in again."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Settings
from pipeline.errors import TransferError
from pipeline.security.grants import issue_grant
from pipeline.security.tokens import TokenStore
from pipeline.store import State, Task, TaskStore
from pipeline.transfer import sftp_client
from pipeline.transfer.checksums import FileRef
from pipeline.transfer.local import LocalStore
from pipeline.transfer.serving import FileServices
from pipeline.transfer.sftp_client import SftpTransport
from tests.conftest import wait_for
from tests.transfer.conftest import SERVER_SECRET, put_input, worker_settings
from tests.transfer.openssh import free_port

SECRET = SERVER_SECRET


@pytest.fixture
def server_settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "server", sftp_port=free_port(), grant_ttl_s=600)


@pytest.fixture
def workers(tmp_path: Path, served: FileServices, tokens: TokenStore) -> Iterator[Any]:
    """Makes an enrolled worker's transport: ``workers(name, capability)``; all closed at the end."""
    made: list[SftpTransport] = []

    def make(name: str, capability: str) -> SftpTransport:
        assert served.sftp is not None
        token, _ = tokens.issue(name, capability, 3600)
        (tmp_path / name).mkdir()
        settings = worker_settings(
            tmp_path / name,
            served.sftp.port,
            worker_token=token,
            sftp_password=None,
            sftp_host_key=served.sftp.fingerprint,
        )
        made.append(SftpTransport(settings))
        return made[-1]

    yield make
    for transport in made:
        transport.close()


def new_task(tasks: TaskStore, files: LocalStore, task_id: str, queue: str, content: bytes) -> FileRef:
    """A queued task routed to ``queue``, with its input in the store, as a submit leaves it."""
    ref = put_input(files, task_id, "in.wav", content)
    tasks.create(Task(task_id, "transcribe", State.queued, "in.wav", ref.to_dict(), {}, {"queue": queue}))
    return ref


def grant(files: LocalStore, task_id: str, capability: str) -> str:
    """The grant the server signs into the task's message when it publishes it to ``capability``'s queue."""
    return issue_grant(SECRET, task_id, [files.input_path(task_id, "in.wav")], 600, capability)


def test_a_cpu_worker_cannot_present_a_gpu_tasks_grant(
    workers: Any, tasks: TaskStore, files: LocalStore, tmp_path: Path
) -> None:
    """A CPU worker's token holding a GPU task's grant (read off the queue, or stolen) reaches nothing."""
    ref = new_task(tasks, files, "on-gpu", "gpu", b"RIFF gpu task")
    cpu = workers("cpu-box", "cpu")
    refusal = r"transfer grant of task on-gpu is for gpu workers, not cpu \(the task is routed to gpu\)"
    cpu.session()
    # Refused each time it is presented; the worker presents it again for a while (a reroute's
    # record may land a moment after the moved message), then gives up with the server's reason.
    cpu.authorize("on-gpu", grant(files, "on-gpu", "gpu"))
    with pytest.raises(TransferError, match=rf"on-gpu/input/in.wav: download failed .*{refusal}"):
        cpu.download(ref, tmp_path / "stolen")
    (tmp_path / "out.txt").write_text("forged transcript")
    with pytest.raises(TransferError, match=refusal):
        cpu.upload(tmp_path / "out.txt", files.output_path("on-gpu", "talk.txt"))
    assert not files.resolve(files.output_path("on-gpu", "talk.txt")).exists()
    cpu.forget("on-gpu")
    with pytest.raises(TransferError, match="on-gpu/input/in.wav: the SFTP server refused to read it"):
        cpu.download(ref, tmp_path / "stolen")  # on a session that holds no grant of it

    gpu = workers("gpu-box", "gpu")  # the workers it was issued to
    gpu.authorize("on-gpu", grant(files, "on-gpu", "gpu"))
    assert gpu.download(ref, tmp_path / "in.wav").read_bytes() == b"RIFF gpu task"


def test_a_grant_opens_to_the_queue_its_task_was_rerouted_to(
    workers: Any, tasks: TaskStore, files: LocalStore, tmp_path: Path
) -> None:
    """The sweep moves a GPU task to the CPU queue with its message, grant and all: the CPU worker
    that takes it is served; a GPU worker may no longer present a grant issued to the CPU queue."""
    ref = new_task(tasks, files, "moved", "gpu", b"RIFF moved task")
    signed_for_gpu = grant(files, "moved", "gpu")
    assert tasks.reroute([("moved", "gpu", "cpu", "no GPU worker is connected")], by="sweep") == 1

    cpu = workers("cpu-box", "cpu")
    cpu.authorize("moved", signed_for_gpu)
    assert cpu.download(ref, tmp_path / "in.wav").read_bytes() == b"RIFF moved task"
    (tmp_path / "out.txt").write_text("transcript")
    files.check(cpu.upload(tmp_path / "out.txt", files.output_path("moved", "talk.txt")))

    other = new_task(tasks, files, "cpu-task", "cpu", b"RIFF cpu task")
    gpu = workers("gpu-box", "gpu")
    gpu.authorize("cpu-task", grant(files, "cpu-task", "cpu"))
    with pytest.raises(TransferError, match=r"is for cpu workers, not gpu \(the task is routed to cpu\)"):
        gpu.download(other, tmp_path / "other")


def test_a_worker_of_the_new_queue_is_served_when_the_move_is_recorded_a_moment_late(
    workers: Any, tasks: TaskStore, files: LocalStore, tmp_path: Path
) -> None:
    """A GPU worker's fallback moves the message to cpu and reports the move; a CPU worker takes
    the copy before the server recorded it. Its grant is refused for now, not for good: the
    worker presents it again after a pause and is served once the store routes the task to cpu."""
    ref = new_task(tasks, files, "fell-back", "gpu", b"RIFF fell back")
    cpu = workers("cpu-box", "cpu")
    recorded: list[int] = []

    def pause_while_the_report_lands(seconds: float) -> None:
        if not recorded:
            recorded.append(tasks.reroute([("fell-back", "gpu", "cpu", "GPU failed")], by="gpu-box"))

    cpu.sleep = pause_while_the_report_lands
    cpu.authorize("fell-back", grant(files, "fell-back", "gpu"))
    assert cpu.download(ref, tmp_path / "in.wav").read_bytes() == b"RIFF fell back"
    assert recorded == [1]


def test_a_revoked_worker_is_cut_off_mid_transfer_and_cannot_log_in_again(
    workers: Any,
    tasks: TaskStore,
    files: LocalStore,
    tokens: TokenStore,
    served: FileServices,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker's token is revoked while it downloads a large input over an open session: the
    server closes the session within seconds, the download fails, and the token logs in no more."""
    assert served.sftp is not None
    ref = new_task(tasks, files, "big", "gpu", os.urandom(24 * 1024 * 1024))
    worker = workers("gpu-box", "gpu")
    worker.authorize("big", grant(files, "big", "gpu"))
    token_id = tokens.list()[0].id
    add = sftp_client._Download.add
    received: list[int] = []

    def revoke_after_the_first_block(download: Any, data: bytes) -> None:
        if not received:  # the transfer is under way: revoke, and wait until the server acts on it
            tokens.revoke(token_id)
            wait_for(
                "the server to close the revoked worker's session",
                lambda: "gpu-box" not in served.sftp.logins,  # type: ignore[union-attr]
                timeout=30,
            )
        received.append(len(data))
        add(download, data)

    monkeypatch.setattr(sftp_client._Download, "add", revoke_after_the_first_block)
    with pytest.raises(TransferError, match=r"refused worker 'gpu-box'"):
        worker.download(ref, tmp_path / "big.wav")
    assert sum(received) < ref.size
    assert not (tmp_path / "big.wav").exists()
    with pytest.raises(TransferError, match=r"refused worker 'gpu-box'"):
        worker.session()  # a new connection with the revoked token
