"""One server per vhost: a second server on the same vhost refuses to start, with the reason."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.conftest import BIN, Stack, free_port

pytestmark = [pytest.mark.rabbitmq]


def test_a_second_server_on_the_vhost_refuses_until_the_first_dies(stack: Stack, tmp_path: Path) -> None:
    """Two servers on one vhost would each consume ``control`` into their own database: the
    second refuses to start (exit 2, one line: the reason and the fix), and once the first is
    killed with SIGKILL, which gives it no chance to let go, the second starts."""
    stack.start_server()
    other = tmp_path / "other"
    other.mkdir()
    port = free_port()
    env = {
        "MORAG_DATA_DIR": str(other),
        "MORAG_API_PORT": str(port),
        "MORAG_SFTP_PORT": str(free_port()),
        "MORAG_SERVER_URL": f"http://127.0.0.1:{port}",
        "MORAG_LOG_JSON": "false",
    }
    second = stack.spawn("second-server", [str(BIN / "morag-pipeline"), "server"], **env)
    assert second.wait(60) == 2
    log = stack.log("second-server")
    [error] = [line for line in log.splitlines() if "another morag-pipeline server" in line]
    assert error.startswith("morag-pipeline: another morag-pipeline server consumes this vhost"), log
    assert "run one server per vhost, or give each its own MORAG_BROKER_URL vhost" in error
    assert "server starting" not in log  # refused before it served anything
    # The first still serves.
    assert stack.get("/healthz").status_code == 200

    stack.stop("server", sig=signal.SIGKILL)
    stack.env.update(env)
    stack.url = f"http://127.0.0.1:{port}"
    stack.start_server()  # fails with the server's log if it exits
    assert stack.get("/healthz").status_code == 200
