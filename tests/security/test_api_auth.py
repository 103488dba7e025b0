"""API authentication: roles, worker tokens refused, failures rate-limited, no secret no server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pipeline.api.app import create_app
from pipeline.api.auth import Authenticator
from pipeline.config import Settings, use_settings
from pipeline.security.ratelimit import FailureLimiter
from pipeline.services import Services, build_services

SECRET = "k" * 48


@pytest.fixture
def services(tmp_path: Path, stub_broker) -> Services:  # type: ignore[no-untyped-def]
    return build_services(use_settings(Settings(data_dir=tmp_path, secret_key=SECRET)))


@pytest.fixture
def client(services: Services, stub_broker) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    auth = Authenticator(services.apikeys, services.tokens, FailureLimiter(max_failures=5, window_s=60))
    with TestClient(create_app(services, stub_broker, gpu_workers=lambda: 1, auth=auth)) as c:
        yield c


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def submit(client: TestClient, path: Path, headers: dict[str, str]):  # type: ignore[no-untyped-def]
    with path.open("rb") as f:
        return client.post("/api/v1/tasks", files={"file": (path.name, f)}, headers=headers)


def test_roles(client: TestClient, services: Services, samples: Path) -> None:
    readonly, _ = services.apikeys.create("dashboard", "readonly")
    submitter, _ = services.apikeys.create("morag", "client")
    assert client.get("/api/v1/tasks", headers=bearer(readonly)).status_code == 200
    refused = submit(client, samples / "report.html", bearer(readonly))
    assert refused.status_code == 403
    assert refused.json()["detail"] == "this needs the client role; your key has readonly"
    accepted = submit(client, samples / "report.html", {"X-API-Key": submitter})
    assert accepted.status_code == 201


def test_missing_unknown_and_revoked_keys(client: TestClient, services: Services) -> None:
    assert client.get("/api/v1/tasks").status_code == 401
    assert client.get("/api/v1/tasks").json()["detail"] == "authentication required: no API key"
    forged = client.get("/api/v1/tasks", headers=bearer("mpk_0123456789ab_guessed"))
    assert forged.status_code == 401 and forged.json()["detail"].endswith("unknown API key")
    key, record = services.apikeys.create("old", "admin")
    services.apikeys.revoke(record.id)
    revoked = client.get("/api/v1/tasks", headers=bearer(key))
    assert revoked.status_code == 401 and "was revoked" in revoked.json()["detail"]
    assert client.get("/healthz").status_code == 200  # health needs no key


def test_worker_tokens_cannot_use_the_api(client: TestClient, services: Services, samples: Path) -> None:
    token, _ = services.tokens.issue("gpu-box", "gpu", 3600)
    response = submit(client, samples / "report.html", bearer(token))
    assert response.status_code == 403
    assert response.json()["detail"] == "worker tokens cannot use the API; use an API key"


def test_repeated_failures_are_rate_limited(client: TestClient, services: Services) -> None:
    for _ in range(5):
        assert client.get("/api/v1/tasks", headers=bearer("mpk_nope_nope")).status_code == 401
    key, _ = services.apikeys.create("late", "admin")
    limited = client.get("/api/v1/tasks", headers=bearer(key))
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0


def test_failures_are_audited(client: TestClient, services: Services) -> None:
    from pipeline.security.audit import open_audit_log

    log = services.settings.data_dir / "audit.log"
    open_audit_log(log)
    client.get("/api/v1/tasks", headers=bearer("mpk_x_y"))
    assert '"event": "auth.failed"' in log.read_text()
    assert '"reason": "unknown API key"' in log.read_text()


@pytest.mark.parametrize("secret", [None, "changeme", "short-secret"])
def test_server_refuses_weak_secrets(tmp_path: Path, secret: str | None) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MORAG_")}
    env["MORAG_DATA_DIR"] = str(tmp_path)
    if secret is not None:
        env["MORAG_SECRET_KEY"] = secret
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "morag-pipeline"), "server"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("morag-pipeline: MORAG_SECRET_KEY is missing, a known default or shorter")
    assert len(proc.stderr.strip().splitlines()) == 1
