"""API keys of clients, with a role each: admin, client or readonly.

Keys look like ``mpk_<id>_<secret>``; the server keeps the id, the role and a
SHA-256 of the whole key, never the key itself.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.db import Database
from pipeline.security.tokens import AuthError

ROLES = ("readonly", "client", "admin")
PREFIX = "mpk_"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    digest TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
"""


@dataclass
class ApiKey:
    id: str
    name: str
    role: str
    created_at: float
    revoked_at: float | None = None


def allows(role: str, needed: str) -> bool:
    """Whether ``role`` includes ``needed`` (admin > client > readonly)."""
    return ROLES.index(role) >= ROLES.index(needed)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeyStore:
    """API keys in the server's SQLite database.

    Parameters:
      db_path: the server's database file.
    """

    def __init__(self, db_path: Path) -> None:
        self.db = Database(db_path, _SCHEMA)

    def create(self, name: str, role: str) -> tuple[str, ApiKey]:
        if role not in ROLES:
            raise AuthError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        key_id = secrets.token_hex(6)
        key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        record = ApiKey(key_id, name, role, time.time())
        with self.db.transaction() as db:
            db.execute(
                "INSERT INTO api_keys (id, name, role, digest, created_at) VALUES (?, ?, ?, ?, ?)",
                (key_id, name, role, _digest(key), record.created_at),
            )
        return key, record

    def check(self, key: str) -> ApiKey:
        """The record of a valid key; AuthError otherwise."""
        if not key.startswith(PREFIX) or key.count("_") < 2:
            raise AuthError("malformed API key")
        key_id = key[len(PREFIX) :].split("_", 1)[0]
        row = self.db.connect().execute("SELECT * FROM api_keys WHERE id=?", (key_id,)).fetchone()
        if row is None or not hmac.compare_digest(row["digest"], _digest(key)):
            raise AuthError("unknown API key")
        if row["revoked_at"]:
            raise AuthError(f"API key {key_id} was revoked")
        data = dict(row)
        data.pop("digest")
        return ApiKey(**data)

    def list(self) -> list[ApiKey]:
        rows = (
            self.db.connect()
            .execute("SELECT id, name, role, created_at, revoked_at FROM api_keys ORDER BY created_at")
            .fetchall()
        )
        return [ApiKey(**dict(row)) for row in rows]

    def revoke(self, key_id: str) -> None:
        with self.db.transaction() as db:
            changed = db.execute(
                "UPDATE api_keys SET revoked_at=? WHERE id=? AND revoked_at IS NULL", (time.time(), key_id)
            ).rowcount
        if not changed:
            raise AuthError(f"no active API key {key_id}")
