"""HTTPS for the API and AMQPS to RabbitMQ, with a throwaway CA."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MANAGEMENT, Stack, wait_for
from tests.security.tls import TlsProxy, make_ca_and_server_cert

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    return make_ca_and_server_cert(tmp_path)


def test_https_api_with_pinned_ca(stack: Stack, pki: dict[str, Path], samples: Path) -> None:
    port = stack.url.rsplit(":", 1)[1]
    stack.url = f"https://localhost:{port}"
    stack.verify = str(pki["ca"])
    stack.env.update(
        MORAG_TLS_CERT_FILE=str(pki["cert"]),
        MORAG_TLS_KEY_FILE=str(pki["key"]),
        MORAG_SERVER_URL=stack.url,
    )
    stack.start_server()
    trusted = stack.cli("tasks", "--json", MORAG_TLS_CA_FILE=str(pki["ca"]))
    assert trusted.returncode == 0, trusted.stderr
    untrusted = stack.cli("tasks")
    assert untrusted.returncode == 2
    assert untrusted.stderr.startswith(f"morag-pipeline: TLS failed with {stack.url}")
    assert "MORAG_TLS_CA_FILE" in untrusted.stderr
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://localhost:{port}/healthz")  # plain HTTP is not served


def rabbitmq_api(path: str) -> Any:
    """A GET on RabbitMQ's management API."""
    parts = urllib.parse.urlsplit(MANAGEMENT)
    auth = (parts.username or "guest", parts.password or "guest")
    response = httpx.get(f"{parts.scheme}://{parts.hostname}:{parts.port}{path}", auth=auth, timeout=10)
    response.raise_for_status()
    return response.json()


def test_amqps_broker_with_pinned_ca(
    stack: Stack, pki: dict[str, Path], samples: Path, tmp_path: Path
) -> None:
    plain = urllib.parse.urlsplit(stack.env["MORAG_BROKER_URL"])
    vhost = plain.path.lstrip("/")
    proxy = TlsProxy((plain.hostname or "127.0.0.1", plain.port or 5672), pki["cert"], pki["key"])
    try:
        secure_url = f"amqps://{plain.username}:{plain.password}@localhost:{proxy.port}{plain.path}"
        stack.env.update(MORAG_BROKER_URL=secure_url, MORAG_BROKER_CA_FILE=str(pki["ca"]))
        stack.start_server()
        stack.start_worker("cpu")  # enrolled: its broker URL comes from its morag.env
        assert stack.bundles["cpu-worker"]["MORAG_BROKER_URL"].startswith("amqps://")
        proc = stack.cli("submit", "--json", str(samples / "report.html"))
        assert proc.returncode == 0, proc.stderr + stack.all_logs()
        task = json.loads(proc.stdout)
        assert task["state"] == "done" and task["worker"] == "cpu-worker"
        assert "# Quarterly ingestion report" in stack.get(f"/api/v1/tasks/{task['id']}/result").text

        # The task went both ways over TLS: the worker's consumer of cpu and the server's
        # consumer of control sit on connections the TLS proxy forwarded, and so does every
        # other connection on the vhost (the publishers).
        through_tls = set(proxy.upstream_ports)

        def listed() -> dict[str, Any] | None:  # the management API's view lags behind the broker
            found = {
                c["queue"]["name"]: c["channel_details"]
                for c in rabbitmq_api(f"/api/consumers/{vhost}")
                if isinstance(c["channel_details"], dict) and "peer_port" in c["channel_details"]
            }  # a consumer's channel details come a moment after the consumer ([] until then)
            return found if {"cpu", "control"} <= set(found) else None

        consumers = wait_for("the consumers in the management API", listed, timeout=60)
        for queue in ("cpu", "control"):
            assert consumers[queue]["peer_port"] in through_tls, (queue, consumers[queue], through_tls)
        connections = rabbitmq_api(f"/api/vhosts/{vhost}/connections")
        assert connections and {c["peer_port"] for c in connections} <= through_tls, connections
        assert proxy.refused == []

        # A CA that did not sign the broker's certificate: the server refuses to start, with
        # the reason on one line, and the broker's certificate is what it refused.
        (tmp_path / "other").mkdir()
        other = make_ca_and_server_cert(tmp_path / "other", "another CA")["ca"]
        refused = stack.cli("config", "check", MORAG_BROKER_CA_FILE=str(other))
        assert refused.returncode == 0  # config itself is fine; the connection is what fails
        bad = stack.spawn("server-bad-ca", [str(Path(stack.processes["server"].args[0])), "server"],
                          MORAG_BROKER_CA_FILE=str(other), MORAG_API_PORT="1")  # fmt: skip
        assert bad.wait(60) == 2
        [error] = [
            line for line in stack.log("server-bad-ca").splitlines() if "cannot reach RabbitMQ" in line
        ]
        assert f"cannot reach RabbitMQ at amqps://{plain.username}:" in error, error
        assert f"@localhost:{proxy.port}" in error, error
        assert "CERTIFICATE_VERIFY_FAILED" in error and "set MORAG_BROKER_CA_FILE" in error, error
        assert any("unknown ca" in reason.lower() for reason in proxy.refused), proxy.refused
    finally:
        proxy.close()
