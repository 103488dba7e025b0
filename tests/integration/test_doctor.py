"""``morag-pipeline doctor`` against a running stack: ready on a healthy server box and worker box,
and each fault injected in turn named on one line with its fix, with exit code 1."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import pytest
from pydantic import SecretStr

from pipeline.cli.doctor import Status, check_database
from pipeline.config import Settings
from tests.conftest import BIN, Stack, free_port, fresh_vhost, open_stack

pytestmark = pytest.mark.rabbitmq


@pytest.fixture(scope="module")
def stack(rabbitmq_available: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One server for the module's checks; each test makes its own fault, on the worker's side."""
    with fresh_vhost() as vhost, open_stack(tmp_path_factory.mktemp("doctor"), vhost) as running:
        running.start_server()
        yield running


def enroll(stack: Stack, name: str, *options: str) -> Path:
    """A worker box's folder holding the morag.env ``token issue`` wrote for it."""
    box = stack.data_dir.parent / name
    box.mkdir(exist_ok=True)
    proc = stack.cli("token", "issue", "--worker", name, "--capability", "gpu", "--env-file",
                     str(box / "morag.env"), *options)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return box


@pytest.fixture(scope="module")
def gpu_box(stack: Stack) -> Iterator[Path]:
    """An enrolled GPU box with a RabbitMQ user of its own, limited to its queues."""
    box = enroll(stack, "doctor-gpu", "--broker-user")
    yield box
    stack.cli("token", "revoke", token_id(box))  # deletes its RabbitMQ user


def token_id(box: Path) -> str:
    settings = dict(line.split("=", 1) for line in (box / "morag.env").read_text().splitlines())
    return str(jwt.decode(settings["MORAG_WORKER_TOKEN"], options={"verify_signature": False})["jti"])


def doctor(stack: Stack, box: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """``morag-pipeline doctor`` on the server's host (``box`` None) or on a worker box: in its
    folder, with its morag.env and none of the server's settings."""
    if box is None:
        return stack.cli("doctor")
    return subprocess.run(
        [str(BIN / "morag-pipeline"), "doctor"],
        env={**stack.worker_env(), "MORAG_DATA_DIR": str(box), **env},
        cwd=box,
        capture_output=True,
        text=True,
        timeout=180,
    )


def lines(proc: subprocess.CompletedProcess, status: str) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line.startswith(status)]


def problems(proc: subprocess.CompletedProcess) -> list[str]:
    """The problem lines; each must carry its fix."""
    found = lines(proc, "PROBLEM")
    for line in found:
        assert " -- fix: " in line, line
    return found


def test_a_healthy_server_box_is_ready(stack: Stack) -> None:
    proc = doctor(stack)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "as server" in proc.stdout
    checks = {line.split()[1].rstrip(":") for line in lines(proc, "ok")}
    assert {"broker", "management", "database", "ffmpeg", "ffprobe", "disk"} <= checks, proc.stdout
    assert proc.stdout.rstrip().endswith("ready")


def test_a_healthy_gpu_box_is_ready_and_says_where_the_model_runs(stack: Stack, gpu_box: Path) -> None:
    proc = doctor(stack, gpu_box)
    print(proc.stdout)  # what an operator sees (pytest -rP shows it)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "as gpu (the token of worker doctor-gpu)" in proc.stdout
    ok = "\n".join(lines(proc, "ok"))
    # Its own RabbitMQ user declares and consumes its queue: the permissions token issue gave it.
    assert "amqp://doctor-gpu:****@" in ok and "declares gpu and consumes gpu" in ok
    assert "sftp host key:" in ok and "token: accepted for worker doctor-gpu (gpu)" in ok
    assert "clock: within" in ok
    # No GPU on this machine: the model loads on the CPU, which is a note, not a problem.
    assert "model: tiny.en loads on cpu" in proc.stdout
    assert not problems(proc)


def test_the_server_box_database_on_postgresql(postgres_url: str, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url=postgres_url)
    [found] = check_database(settings, "server")
    assert found.status is Status.ok and found.text.startswith("PostgreSQL ")
    down = settings.model_copy(
        update={"database_url": SecretStr(f"postgresql://postgres@127.0.0.1:{free_port()}/x")}
    )
    [found] = check_database(down, "server")
    assert found.status is Status.problem
    assert "cannot open postgresql://postgres:****@127.0.0.1:" in found.text
    assert found.fix == "start PostgreSQL, or correct MORAG_DATABASE_URL"


def test_broker_down(stack: Stack, gpu_box: Path) -> None:
    port = free_port()  # nothing listens there
    proc = doctor(stack, gpu_box, MORAG_BROKER_URL=f"amqp://guest:guest@127.0.0.1:{port}/%2F")
    assert proc.returncode == 1
    [line] = [line for line in problems(proc) if line.startswith("PROBLEM broker:")]
    assert f"cannot connect to RabbitMQ at 127.0.0.1:{port}" in line
    assert "fix: start RabbitMQ there, or set MORAG_BROKER_URL" in line


def test_wrong_host_key(stack: Stack, gpu_box: Path) -> None:
    proc = doctor(stack, gpu_box, MORAG_SFTP_HOST_KEY="SHA256:" + "A" * 43)
    assert proc.returncode == 1
    [line] = [line for line in problems(proc) if "sftp host key" in line]
    assert "not the pinned MORAG_SFTP_HOST_KEY" in line and "fix: pin the key" in line


def test_ffmpeg_missing_from_path(stack: Stack, gpu_box: Path, tmp_path: Path) -> None:
    proc = doctor(stack, gpu_box, PATH=str(tmp_path))  # a folder with no programs
    assert proc.returncode == 1
    found = problems(proc)
    for tool in ("ffmpeg", "ffprobe"):
        expected = f"PROBLEM {tool}: not found on PATH -- fix: apt-get install ffmpeg"
        assert any(line.startswith(expected) for line in found), proc.stdout


class SkewedClock(BaseHTTPRequestHandler):
    """Answers every request with a Date header an hour ahead of this machine's clock."""

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)  # its Date: date_time_string
        self.send_header("Content-Length", "0")
        self.end_headers()

    def date_time_string(self, timestamp: float | None = None) -> str:
        return formatdate(time.time() + 3600, usegmt=True)

    def log_message(self, *args: object) -> None:
        pass


def test_clock_skew(stack: Stack, gpu_box: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), SkewedClock)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        proc = doctor(stack, gpu_box, MORAG_SERVER_URL=url)
    finally:
        server.shutdown()
    assert proc.returncode == 1
    [line] = [line for line in problems(proc) if line.startswith("PROBLEM clock:")]
    behind = int(re.search(r"this clock is (\d+) s behind the server's", line).group(1))
    assert 3598 <= behind <= 3602, line
    assert "fix: keep both clocks on NTP" in line


def test_revoked_token(stack: Stack) -> None:
    box = enroll(stack, "doctor-revoked")
    assert doctor(stack, box).returncode == 0
    assert stack.cli("token", "revoke", token_id(box)).returncode == 0
    proc = doctor(stack, box)
    assert proc.returncode == 1
    [line] = [line for line in problems(proc) if line.startswith("PROBLEM token:")]
    assert "refused the token of worker doctor-revoked: revoked" in line
    assert "fix: on the server host: morag-pipeline token issue --worker doctor-revoked" in line
