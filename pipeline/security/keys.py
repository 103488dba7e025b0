"""The server secret and what is derived from it."""

from __future__ import annotations

import hashlib
import hmac

from pipeline.config import Settings
from pipeline.errors import PipelineError

#: Secrets that must never sign anything outside development mode.
KNOWN_WEAK = {"", "secret", "changeme", "change-me", "morag", "dev", "development", "insecure"}
DEV_SECRET = "morag-development-mode-insecure-secret"


class InsecureSecret(PipelineError):
    """The server secret is missing or a known default."""


def server_secret(settings: Settings) -> bytes:
    """The key that signs tokens and grants; refuses weak secrets outside dev mode."""
    value = settings.secret_key.get_secret_value() if settings.secret_key else ""
    if value.lower() in KNOWN_WEAK or len(value) < 32:
        if settings.dev_mode:
            return (value or DEV_SECRET).encode()
        raise InsecureSecret(
            "MORAG_SECRET_KEY is missing, a known default or shorter than 32 characters; set a random one "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`) or start with "
            "MORAG_DEV_MODE=true for development"
        )
    return value.encode()


def derive(secret: bytes, purpose: str, ident: str) -> str:
    """A key for one purpose and one identity, recomputable by the server alone."""
    return hmac.new(secret, f"{purpose}:{ident}".encode(), hashlib.sha256).hexdigest()


#: The file in the server's data directory that lets a worker sharing it check it holds the same secret.
SECRET_CHECK_NAME = "secret.check"


def secret_check(secret: bytes) -> str:
    """What the server writes to ``SECRET_CHECK_NAME``: derived from its secret, revealing nothing of it."""
    return derive(secret, "secret-check", "server")


def write_secret_check(settings: Settings) -> None:
    """The server, at start: record which secret it holds, for the workers sharing its data directory."""
    path = settings.data_dir / SECRET_CHECK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(secret_check(server_secret(settings)) + "\n")


def differs_from_server(settings: Settings) -> bool:
    """Whether this process's secret is not the one the server in its data directory holds.

    False when no server wrote its check there (another host, or a server not yet started).
    """
    try:
        recorded = (settings.data_dir / SECRET_CHECK_NAME).read_text().strip()
    except OSError:
        return False
    return not hmac.compare_digest(recorded.encode(), secret_check(server_secret(settings)).encode())
