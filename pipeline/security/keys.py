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
