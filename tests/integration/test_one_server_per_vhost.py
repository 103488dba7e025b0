"""One server per vhost, or replicas of one server on PostgreSQL: a server that would share a vhost
with another it cannot work beside refuses to start, with the reason."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.conftest import BIN, Stack, free_port, fresh_postgres_database, open_stack

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
    assert "run one server per vhost, give each its own MORAG_BROKER_URL vhost, or run replicas" in error
    assert "server starting" not in log  # refused before it served anything
    # The first still serves.
    assert stack.get("/healthz").status_code == 200

    stack.stop("server", sig=signal.SIGKILL)
    stack.env.update(env)
    stack.url = f"http://127.0.0.1:{port}"
    stack.start_server()  # fails with the server's log if it exits
    assert stack.get("/healthz").status_code == 200


def refusal(stack: Stack, name: str, **env: str) -> str:
    """Start another server on the stack's vhost with ``env``; its one-line refusal (exit 2)."""
    port = free_port()
    folder = stack.data_dir.parent / name
    folder.mkdir()
    settings = {"MORAG_DATA_DIR": str(folder), "MORAG_API_PORT": str(port),
                "MORAG_SFTP_PORT": str(free_port()), "MORAG_LOG_JSON": "false", **env}  # fmt: skip
    proc = stack.spawn(name, [str(BIN / "morag-pipeline"), "server"], **settings)
    assert proc.wait(60) == 2, stack.log(name)
    log = stack.log(name)
    assert "server starting" not in log  # refused before it served anything
    [line] = [line for line in log.splitlines() if line.startswith("morag-pipeline: ")]
    return line


@pytest.mark.postgresql
def test_replicas_share_their_store_secret_and_host_key_or_are_refused(
    tmp_path: Path, vhost: str, postgres_url: str, request: pytest.FixtureRequest
) -> None:
    """Replicas of one server run on one PostgreSQL database; one that differs from the running
    replicas in what they must share is refused, naming what differs and the fix; a single server
    on SQLite and replicas never share a vhost."""
    shared = tmp_path / "shared"
    env = {"MORAG_DATABASE_URL": postgres_url, "MORAG_FILES_DIR": str(shared / "files"),
           "MORAG_SFTP_SERVER_KEY_FILE": str(shared / "host_key")}  # fmt: skip
    with open_stack(tmp_path, vhost, request, env=env) as stack:
        stack.start_server()

        line = refusal(stack, "on-sqlite", MORAG_DATABASE_URL="")
        assert "1 morag-pipeline server replicas with a PostgreSQL store consume this vhost" in line
        assert "set MORAG_DATABASE_URL to their database to join them" in line

        line = refusal(stack, "other-secret", MORAG_SECRET_KEY="another" * 8)
        assert "this replica cannot join the running ones: its MORAG_SECRET_KEY differs" in line
        line = refusal(stack, "other-files", MORAG_FILES_DIR=str(tmp_path / "elsewhere"))
        assert "its MORAG_FILES_DIR is not the folder the running replicas share" in line
        line = refusal(stack, "other-key", MORAG_SFTP_SERVER_KEY_FILE=str(tmp_path / "own_key"))
        assert "its SFTP host key differs" in line and "MORAG_SFTP_SERVER_KEY_FILE" in line
        with fresh_postgres_database("morag_other") as other:
            line = refusal(stack, "other-database", MORAG_DATABASE_URL=other)
        assert "replicas on another database consume this vhost" in line
        assert "this replica's MORAG_DATABASE_URL reaches another database than theirs" in line
        assert stack.get("/healthz").json()["parts"]["replicas"] == {
            "ok": True,
            "replicated": True,
            "running": 1,
        }

        # Once the replicas are gone, a server on SQLite may take the vhost; replicas are then refused.
        stack.stop("server", sig=signal.SIGKILL)
        for name in env:
            del stack.env[name]
        stack.start_server()
        stack.env.update(env)
        line = refusal(stack, "replica", **env)
        assert "a morag-pipeline server with its own SQLite store holds this vhost" in line
