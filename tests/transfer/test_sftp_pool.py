"""The threads of a worker process share a small pool of SSH connections to the SFTP server: never
more than ``sftp_pool_connections`` per process, however many threads and workers; an idle one is
closed after ``sftp_pool_idle_s`` and reopened on demand; one the server closes is reopened, and the
grants its threads hold are presented on the new one."""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Settings
from pipeline.security.grants import issue_grant
from pipeline.security.tokens import TokenStore
from pipeline.store import State, Task, TaskStore
from pipeline.transfer import sftp_client
from pipeline.transfer.checksums import FileRef
from pipeline.transfer.local import LocalStore
from pipeline.transfer.serving import FileServices, start_file_services
from pipeline.transfer.sftp_client import SftpTransport
from tests.conftest import wait_for
from tests.transfer.conftest import SERVER_SECRET, put_input, worker_settings
from tests.transfer.openssh import free_port

#: Threads of one worker process (Dramatiq's default).
THREADS = 8
#: Workers of the simulated fleet, each a process with its own pool and token.
FLEET = 100
#: Threads of each worker of the fleet: more than its pool's 2 connections, so that its threads
#: share them. Not Dramatiq's 8: the fleet's workers are threads of this one process, and 800
#: of them with their 800 SFTP channels (a server thread each) on one interpreter took 100 s of
#: CPU here instead of 25 s with 300, and under a loaded suite several minutes, starving the
#: tests beside it. Eight threads sharing a pool: ``test_threads_of_a_worker_share_the_pool``.
FLEET_THREADS = 3


@pytest.fixture
def server_settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "server", sftp_port=free_port(), grant_ttl_s=600)


@pytest.fixture
def logins(caplog: pytest.LogCaptureFixture) -> Callable[[], Counter[str]]:
    """Counts the logins the SFTP server records, per worker name."""
    caplog.set_level(logging.INFO, logger="pipeline.transfer.sftp_server")

    def count() -> Counter[str]:
        return Counter(
            getattr(r, "worker", None) for r in list(caplog.records) if r.getMessage() == "sftp login"
        )

    return count


class Worker:
    """One enrolled worker process: its token, its settings, and a transport per thread.

    Parameters:
      name: the worker's name (its token's subject).
      settings: its settings.
    """

    def __init__(self, name: str, settings: Settings) -> None:
        self.name = name
        self.settings = settings
        self.transports: list[SftpTransport] = []

    def transport(self) -> SftpTransport:
        """A thread's transport, as the actors open one per thread."""
        self.transports.append(SftpTransport(self.settings))
        return self.transports[-1]

    def close(self) -> None:
        for transport in self.transports:
            transport.close()


@pytest.fixture
def enroll(tmp_path: Path, served: FileServices, tokens: TokenStore) -> Iterator[Callable[..., Worker]]:
    """Enrolls a worker: ``enroll(name, **settings)``; every one closed at the end."""
    assert served.sftp is not None
    made: list[Worker] = []

    def make(name: str, **overrides: Any) -> Worker:
        assert served.sftp is not None
        token, _ = tokens.issue(name, "gpu", 3600)
        folder = tmp_path / "workers" / name
        folder.mkdir(parents=True)
        values: dict[str, Any] = {
            "worker_token": token,
            "worker_name": name,
            "sftp_password": None,
            "sftp_host_key": served.sftp.fingerprint,
            **overrides,
        }
        made.append(Worker(name, worker_settings(folder, served.sftp.port, **values)))
        return made[-1]

    yield make
    for worker in made:
        worker.close()


def new_task(tasks: TaskStore, files: LocalStore, task_id: str, content: bytes) -> tuple[FileRef, str]:
    """A queued GPU task with its input in the store, and the grant its message carries."""
    ref = put_input(files, task_id, "in.wav", content)
    tasks.create(Task(task_id, "transcribe", State.queued, "in.wav", ref.to_dict(), {}, {"queue": "gpu"}))
    grant = issue_grant(SERVER_SECRET, task_id, [files.input_path(task_id, "in.wav")], 600, "gpu")
    return ref, grant


def run_task(
    transport: SftpTransport, files: LocalStore, folder: Path, task_id: str, ref: FileRef, grant: str
) -> FileRef:
    """What a worker thread does with a task's files: authorize, download, upload, forget."""
    folder.mkdir(parents=True, exist_ok=True)
    transport.authorize(task_id, grant)
    try:
        local = transport.download(ref, folder / "in.wav")
        output = folder / "talk.txt"
        output.write_bytes(b"transcript of " + local.read_bytes())
        return transport.upload(output, files.output_path(task_id, "talk.txt"))
    finally:
        transport.forget(task_id)


def check_output(files: LocalStore, uploaded: FileRef, content: bytes) -> None:
    """What the control actor checks before it marks a task done, and the bytes a user downloads."""
    files.check(uploaded)
    assert files.resolve(uploaded.path).read_bytes() == b"transcript of " + content


def test_threads_of_a_worker_share_the_pool(
    enroll: Callable[..., Worker],
    tasks: TaskStore,
    files: LocalStore,
    tmp_path: Path,
    logins: Callable[[], Counter[str]],
) -> None:
    """8 threads, 3 tasks each, all at once: every output verifies, and the server sees at most
    ``sftp_pool_connections`` logins of this worker in all."""
    worker = enroll("gpu-box")
    contents = {f"t{n}-{i}": os.urandom(1000 * (n + 1)) for n in range(THREADS) for i in range(3)}
    refs = {task_id: new_task(tasks, files, task_id, content) for task_id, content in contents.items()}
    start = threading.Barrier(THREADS)

    def thread(n: int) -> None:
        transport = worker.transport()
        start.wait()
        for i in range(3):
            task_id = f"t{n}-{i}"
            ref, grant = refs[task_id]
            uploaded = run_task(transport, files, tmp_path / "work" / task_id, task_id, ref, grant)
            check_output(files, uploaded, contents[task_id])

    with ThreadPoolExecutor(THREADS) as pool:
        for done in [pool.submit(thread, n) for n in range(THREADS)]:
            done.result()
    assert 1 <= logins()["gpu-box"] <= worker.settings.sftp_pool_connections == 2


def test_a_fleet_of_workers_each_within_its_pool(
    enroll: Callable[..., Worker],
    tasks: TaskStore,
    files: LocalStore,
    tmp_path: Path,
    logins: Callable[[], Counter[str]],
) -> None:
    """100 worker processes of 3 threads (100 pools, each with its own token) start a task on every
    thread at once, from one address: every transfer completes and verifies, and no worker ever holds
    more than ``sftp_pool_connections`` connections at once. The server closes handshakes beyond its
    per-address limit; the workers try again after their backoff. (A login the server completed
    after the worker stopped waiting for it is retried, so a loaded machine may see more logins in
    all than connections at once.)"""
    peak: Counter[str] = Counter()
    sampling = threading.Event()

    def sample() -> None:  # the connections each worker's pool holds open, every 10 ms
        while not sampling.wait(0.01):
            for worker in workers:
                if worker.transports:
                    open_now = len(worker.transports[0].pool.connections())
                    peak[worker.name] = max(peak[worker.name], open_now)

    workers = [
        # Patient as a real fleet restarting at once must be: about a minute of tries each (on a
        # loaded machine 100 pools queue for the 16 handshakes one address may have in progress).
        enroll(f"box{w:03d}", sftp_attempts=20, sftp_backoff_s=0.1, sftp_max_backoff_s=4.0)
        for w in range(FLEET)
    ]
    jobs = []
    for w, worker in enumerate(workers):
        for n in range(FLEET_THREADS):
            task_id = f"f{w:03d}-{n}"
            content = f"RIFF {task_id}".encode()
            jobs.append((worker, task_id, content, *new_task(tasks, files, task_id, content)))
    start = threading.Barrier(len(jobs))
    uploaded: dict[str, FileRef] = {}
    failures: list[BaseException] = []

    def thread(worker: Worker, task_id: str, ref: FileRef, grant: str) -> None:
        try:
            transport = worker.transport()
            start.wait()
            uploaded[task_id] = run_task(transport, files, tmp_path / "work" / task_id, task_id, ref, grant)
        except BaseException as exc:  # reported below, with the task
            failures.append(exc)

    threads = [
        threading.Thread(target=thread, args=(worker, task_id, ref, grant), daemon=True)
        for worker, task_id, _, ref, grant in jobs
    ]
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not failures, failures[:3]
    assert len(uploaded) == FLEET * FLEET_THREADS
    for _, task_id, content, _, _ in jobs:
        check_output(files, uploaded[task_id], content)
    sampling.set()
    sampler.join()
    seen = logins()
    assert {w.name for w in workers} <= set(seen)
    assert max(peak[w.name] for w in workers) <= 2, peak.most_common(3)


def test_an_idle_connection_is_closed_and_reopened_on_demand(
    enroll: Callable[..., Worker],
    served: FileServices,
    tasks: TaskStore,
    files: LocalStore,
    tmp_path: Path,
    logins: Callable[[], Counter[str]],
) -> None:
    assert served.sftp is not None
    worker = enroll("cpu-box", sftp_pool_idle_s=0.5)
    transport = worker.transport()
    ref, grant = new_task(tasks, files, "first", b"RIFF first")
    check_output(files, run_task(transport, files, tmp_path / "first", "first", ref, grant), b"RIFF first")
    assert logins()["cpu-box"] == 1
    wait_for("the idle connection to close", lambda: "cpu-box" not in served.sftp.logins, timeout=30)  # type: ignore[union-attr]
    assert transport.pool.connections() == []

    ref, grant = new_task(tasks, files, "second", b"RIFF second")
    check_output(files, run_task(transport, files, tmp_path / "second", "second", ref, grant), b"RIFF second")
    assert logins()["cpu-box"] == 2


def test_connections_the_server_closes_are_reopened_with_the_grants_held(
    enroll: Callable[..., Worker],
    served: FileServices,
    server_settings: Settings,
    tasks: TaskStore,
    files: LocalStore,
    tokens: TokenStore,
    tmp_path: Path,
    logins: Callable[[], Counter[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server restarts while 8 threads download their inputs: every connection is closed under
    them. Each download resumes on a new connection, on which the threads' grants are presented
    again (the new server knows none), and each thread's upload is accepted."""
    worker = enroll("gpu-box")
    add = sftp_client._Download.add
    under_way = threading.Barrier(THREADS + 1)
    restarted = threading.Event()
    waited: set[int] = set()

    def wait_for_the_restart(download: Any, data: bytes) -> None:
        if threading.get_ident() not in waited:  # this thread's first block: the download is under way
            waited.add(threading.get_ident())
            under_way.wait(timeout=60)
            assert restarted.wait(timeout=60)
        add(download, data)

    monkeypatch.setattr(sftp_client._Download, "add", wait_for_the_restart)
    contents = {f"r{n}": os.urandom(2 * sftp_client.BLOCK * sftp_client.DEPTH) for n in range(THREADS)}
    refs = {task_id: new_task(tasks, files, task_id, content) for task_id, content in contents.items()}

    def thread(task_id: str) -> FileRef:
        ref, grant = refs[task_id]
        return run_task(worker.transport(), files, tmp_path / "work" / task_id, task_id, ref, grant)

    with ThreadPoolExecutor(THREADS) as pool:
        running = {task_id: pool.submit(thread, task_id) for task_id in contents}
        under_way.wait(timeout=60)
        before = logins()["gpu-box"]
        served.stop()
        again = start_file_services(server_settings, tasks, files, tokens)
        try:
            restarted.set()
            for task_id, done in running.items():
                check_output(files, done.result(timeout=120), contents[task_id])
        finally:
            again.stop()
    assert 1 <= before <= 2
    assert before < logins()["gpu-box"] <= before + 2


def test_a_forked_process_opens_its_own_connections(
    enroll: Callable[..., Worker],
    tasks: TaskStore,
    files: LocalStore,
    tmp_path: Path,
    logins: Callable[[], Counter[str]],
) -> None:
    """Dramatiq forks its worker processes: a child never writes on its parent's connection (which
    would garble both), it logs in on its own, and the parent's connection serves on."""
    worker = enroll("gpu-box")
    transport = worker.transport()
    tasks_made = {t: new_task(tasks, files, t, f"RIFF {t}".encode()) for t in ("parent", "child", "after")}
    ref, grant = tasks_made["parent"]
    check_output(files, run_task(transport, files, tmp_path / "parent", "parent", ref, grant), b"RIFF parent")
    assert logins()["gpu-box"] == 1

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the same transport object, as a thread-local made before the fork
        os.close(read)
        status = 0
        try:
            ref, grant = tasks_made["child"]
            uploaded = run_task(transport, files, tmp_path / "child", "child", ref, grant)
            check_output(files, uploaded, b"RIFF child")
        except BaseException as exc:
            os.write(write, repr(exc).encode())
            status = 1
        os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as child_errors:
        error = child_errors.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, error
    assert logins()["gpu-box"] == 2  # the child's own login

    ref, grant = tasks_made["after"]
    check_output(files, run_task(transport, files, tmp_path / "after", "after", ref, grant), b"RIFF after")
    assert logins()["gpu-box"] == 2  # the parent's connection, still in good order
