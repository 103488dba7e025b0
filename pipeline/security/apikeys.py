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

from sqlalchemy import select, update

from pipeline.config import Settings
from pipeline.db import Database
from pipeline.schema import api_keys
from pipeline.security.roles import ROLES, AuthError

PREFIX = "mpk_"


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
    """API keys in the server's database.

    Parameters:
      db_path: the server's database: its SQLite file, a URL, or the settings naming either.
    """

    def __init__(self, db_path: Path | str | Settings) -> None:
        self.db = Database(db_path)

    def create(self, name: str, role: str) -> tuple[str, ApiKey]:
        if role not in ROLES:
            raise AuthError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        key_id = secrets.token_hex(6)
        key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        record = ApiKey(key_id, name, role, time.time())
        with self.db.transaction() as db:
            db.execute(
                api_keys.insert().values(
                    id=key_id, name=name, role=role, digest=_digest(key), created_at=record.created_at
                )
            )
        return key, record

    def check(self, key: str) -> ApiKey:
        """The record of a valid key; AuthError otherwise."""
        if not key.startswith(PREFIX) or key.count("_") < 2:
            raise AuthError("malformed API key")
        key_id = key[len(PREFIX) :].split("_", 1)[0]
        with self.db.read() as db:
            row = db.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
        if row is None or not hmac.compare_digest(row.digest, _digest(key)):
            raise AuthError("unknown API key")
        if row.revoked_at:
            raise AuthError(f"API key {key_id} was revoked")
        data = dict(row._mapping)
        data.pop("digest")
        return ApiKey(**data)

    def list(self) -> list[ApiKey]:
        c = api_keys.c
        query = select(c.id, c.name, c.role, c.created_at, c.revoked_at).order_by(c.created_at)
        with self.db.read() as db:
            return [ApiKey(**row._mapping) for row in db.execute(query)]

    def revoke(self, key_id: str) -> None:
        with self.db.transaction() as db:
            changed = db.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=time.time())
            ).rowcount
        if not changed:
            raise AuthError(f"no active API key {key_id}")
