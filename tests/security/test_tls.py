"""HTTPS for the API and AMQPS to RabbitMQ, with a throwaway CA."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import httpx
import pytest

from tests.conftest import Stack
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


def test_amqps_broker_with_pinned_ca(
    stack: Stack, pki: dict[str, Path], samples: Path, tmp_path: Path
) -> None:
    plain = urllib.parse.urlsplit(stack.env["MORAG_BROKER_URL"])
    proxy = TlsProxy((plain.hostname or "127.0.0.1", plain.port or 5672), pki["cert"], pki["key"])
    try:
        secure_url = f"amqps://{plain.username}:{plain.password}@localhost:{proxy.port}{plain.path}"
        stack.env.update(MORAG_BROKER_URL=secure_url, MORAG_BROKER_CA_FILE=str(pki["ca"]))
        stack.start_server()
        stack.start_worker("cpu")
        proc = stack.cli("submit", str(samples / "report.html"))
        assert proc.returncode == 0, proc.stderr + stack.all_logs()
        assert "# Quarterly ingestion report" in proc.stdout

        other = (
            make_ca_and_server_cert(tmp_path / "other")["ca"]
            if (tmp_path / "other").mkdir() is None
            else None
        )
        refused = stack.cli("config", "check", MORAG_BROKER_CA_FILE=str(other))
        assert refused.returncode == 0  # config itself is fine; the connection is what fails
        bad = stack.spawn("server-bad-ca", [str(Path(stack.processes["server"].args[0])), "server"],
                          MORAG_BROKER_CA_FILE=str(other), MORAG_API_PORT="1")  # fmt: skip
        assert bad.wait(60) == 2
        assert "cannot reach RabbitMQ" in stack.log("server-bad-ca")
        assert (
            "CERTIFICATE_VERIFY_FAILED" in stack.log("server-bad-ca")
            or "certificate" in stack.log("server-bad-ca").lower()
        )
    finally:
        proxy.close()
