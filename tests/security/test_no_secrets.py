"""Secrets never appear in messages, errors, logs or ``config show`` (real server, workers and RabbitMQ)."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import dramatiq
import httpx
import paramiko
import pytest

from pipeline.config import ConfigError, Settings, load_settings
from pipeline.middleware.message_signing import MessageSigning
from pipeline.security import signatures
from pipeline.security.tokens import TokenStore
from tests.conftest import BIN, management, open_stack, wait_for


def test_a_worker_s_messages_name_its_token_by_id_only(tmp_path: Path) -> None:
    """The token is the worker's SFTP password: anyone reading ``control`` must not get it."""
    token, record = TokenStore(tmp_path / "tasks.db", b"s" * 48).issue("gpu-box-3", "gpu", 3600)
    key = uuid.uuid4().hex + uuid.uuid4().hex
    settings = Settings(worker_token=token, worker_key=key, broker_url="amqp://u:p@h/%2F")
    message = dramatiq.Message("control", "worker_heartbeat", (), {"worker": "gpu-box-3"}, {})
    MessageSigning(settings).before_enqueue(None, message, 0)  # type: ignore[arg-type]
    block = message.options[signatures.OPTION]
    assert set(block) == {signatures.TOKEN_ID, "ts", "nonce", "mac"}
    assert block[signatures.TOKEN_ID] == record.id
    wire = message.encode().decode()
    assert token not in wire and key not in wire


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MORAG_")}
    return subprocess.run([str(BIN / "morag-pipeline"), *args], env={**clean, **env}, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


@pytest.mark.parametrize(
    "url",
    [
        "http://morag:Pa55word-x1@broker:5672/%2F",
        "morag:Pa55word-x1@broker:5672",
        "amqp//morag:Pa55word-x1@b",
    ],
)
def test_a_bad_broker_url_is_echoed_without_its_password(url: str) -> None:
    proc = run_cli("config", "check", MORAG_BROKER_URL=url)
    assert proc.returncode == 2
    assert "MORAG_BROKER_URL: Value error, must start with amqp:// or amqps://" in proc.stderr
    assert "morag:****@b" in proc.stderr  # the user, to know which URL it was
    assert "Pa55word-x1" not in proc.stdout + proc.stderr


def test_a_refused_secret_setting_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(secret_key=["hunter2-secret"], api_port=70000)
    text = str(error.value)
    assert "MORAG_SECRET_KEY" in text and "hunter2-secret" not in text
    assert "(got 70000)" in text  # what is no secret is still echoed


@pytest.fixture
def broker_user(vhost: str) -> Iterator[tuple[str, str]]:
    """A RabbitMQ user of the test's own with a password of its own; yields its AMQP URL and password."""
    base, auth = management()
    parts = urllib.parse.urlsplit(vhost)
    name, password = f"morag-{uuid.uuid4().hex[:8]}", f"broker-pw-{uuid.uuid4().hex}"
    with httpx.Client(base_url=base, auth=auth, timeout=10) as api:
        api.put(f"/api/users/{name}", json={"password": password, "tags": "management"}).raise_for_status()
        api.put(
            f"/api/permissions{parts.path}/{name}", json={"configure": ".*", "write": ".*", "read": ".*"}
        ).raise_for_status()
        try:
            yield f"amqp://{name}:{password}@{parts.hostname}:{parts.port or 5672}{parts.path}", password
        finally:
            api.delete(f"/api/users/{name}")


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_no_secret_in_any_log_or_error(
    tmp_path: Path, broker_user: tuple[str, str], samples: Path, request: pytest.FixtureRequest
) -> None:
    """A server, an enrolled worker and a plain one run a task; a bad broker URL, a revoked token and
    refused keys make errors. No log and no CLI output holds a secret."""
    url, broker_password = broker_user
    outputs: list[str] = []  # everything the CLI and the API said

    with open_stack(tmp_path, url, request) as stack:

        def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
            proc = stack.cli(*args, **env)
            outputs.append(f"$ {' '.join(args)}\n{proc.stdout}{proc.stderr}")
            return proc

        stack.start_server()
        own = stack.data_dir.parent / "worker-gpu-box-1"
        own.mkdir()
        issued = cli("token", "issue", "--worker", "gpu-box-1", "--capability", "gpu", "--env-file",
                     str(own / "morag.env"))  # fmt: skip
        assert issued.returncode == 0, issued.stderr
        bundle = dict(line.split("=", 1) for line in (own / "morag.env").read_text().splitlines() if line)
        stack.bundles["gpu-box-1"] = bundle
        secrets = {
            "the server's secret key": stack.env["MORAG_SECRET_KEY"],
            "the admin's API key": stack.env["MORAG_API_KEY"],
            "the worker token": bundle["MORAG_WORKER_TOKEN"],
            "the worker key": bundle["MORAG_WORKER_KEY"],
            "the broker password": broker_password,
        }

        stack.start_worker("gpu", name="gpu-box-1")  # enrolled: a token, files over SFTP
        stack.start_worker("cpu", name="local-cpu", enroll=False, MORAG_FILE_ACCESS="shared")  # plain
        stack.wait_consumers("gpu")
        stack.wait_consumers("cpu")
        done = cli("submit", "--json", str(samples / "speech.mp3"))
        assert done.returncode == 0, done.stderr + stack.all_logs()
        assert json.loads(done.stdout)["state"] == "done"

        # config show and check, and a bad broker URL holding the password, on the CLI and a worker.
        assert cli("config", "show").returncode == 0
        assert cli("config", "check").returncode == 0
        bad = url.replace("amqp://", "http://")
        assert cli("config", "check", MORAG_BROKER_URL=bad).returncode == 2
        stack.start_worker("cpu", name="bad-url", enroll=False, MORAG_BROKER_URL=bad)
        assert stack.processes["bad-url"].wait(60) != 0
        unreachable = url.replace(f":{urllib.parse.urlsplit(url).port or 5672}/", ":1/")
        stack.start_worker("cpu", name="no-broker", enroll=False, MORAG_BROKER_URL=unreachable)
        wait_for("the worker's connection error", lambda: "Connection refused" in stack.log("no-broker"))
        stack.stop("no-broker")

        # Refused keys: a wrong one, a readonly one asking for an admin's operation, a revoked one.
        outputs.append(
            httpx.get(f"{stack.url}/api/v1/tasks", headers={"Authorization": "Bearer mpk_x_y"}).text
        )
        readonly = stack.cli("apikey", "create", "--name", "auditor", "--role", "readonly")  # prints it, once
        reader = readonly.stdout.strip().splitlines()[-1]
        secrets["a readonly API key"] = reader
        purge = httpx.post(
            f"{stack.url}/api/v1/dead/purge", json={}, headers={"Authorization": f"Bearer {reader}"}
        )
        assert purge.status_code == 403
        outputs.append(purge.text)
        key_id = next(k["id"] for k in json.loads(cli("apikey", "list").stdout) if k["name"] == "auditor")
        assert cli("apikey", "revoke", key_id).returncode == 0
        refused = cli("tasks", MORAG_API_KEY=reader)
        assert refused.returncode != 0
        # A worker token is no API key.
        outputs.append(
            httpx.get(
                f"{stack.url}/api/v1/tasks",
                headers={"Authorization": f"Bearer {bundle['MORAG_WORKER_TOKEN']}"},
            ).text
        )

        # A revoked token: the worker's reports are refused, and so is its SFTP login.
        token_id = issued.stdout.split()[1]  # "token <id> for gpu-box-1 (gpu), expires ..."
        assert cli("token", "revoke", token_id).returncode == 0
        wait_for(
            "the revoked worker's heartbeat to be refused",
            lambda: any(r["worker"] == "gpu-box-1" for r in stack.get("/api/v1/workers").json()["refused"]),
        )
        transport = paramiko.Transport(("127.0.0.1", int(stack.env["MORAG_SFTP_PORT"])))
        try:
            transport.start_client(timeout=30)
            with pytest.raises(paramiko.AuthenticationException):
                transport.auth_password("gpu-box-1", bundle["MORAG_WORKER_TOKEN"])
        finally:
            transport.close()
        outputs.append(json.dumps(stack.get("/api/v1/workers").json()))
        outputs.append(cli("workers").stdout)
        stack.stop_all()

    written = {str(p.relative_to(tmp_path)): p.read_text(errors="replace") for p in tmp_path.rglob("*.log*")}
    assert "logs/server.log" in written and "data/audit.log" in written
    written.update({f"output {i}": text for i, text in enumerate(outputs)})
    found = [(what, where) for where, text in written.items() for what, s in secrets.items() if s in text]
    assert not found, found
