"""Worker tokens: JWTs the server issues, records and can revoke.

A token names its worker (``sub``), capability (``cap``: gpu or cpu), issue
and expiry times and id (``jti``). With it comes the worker's signing key,
derived from the server secret and the token id, that the worker signs its
messages with; a signed message names the token by its id alone
(``check_id``). Revocation is a row in the server's database, read on every
check, so it takes effect without a restart.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from sqlalchemy import select, update

from pipeline.config import Settings
from pipeline.db import Database
from pipeline.schema import worker_tokens
from pipeline.security.keys import derive
from pipeline.security.roles import CAPABILITIES, ISSUER, AuthError


@dataclass
class TokenRecord:
    id: str
    worker: str
    capability: str
    issued_at: float
    expires_at: float
    revoked_at: float | None = None
    broker_user: str | None = None
    last_used_at: float | None = None

    @property
    def state(self) -> str:
        if self.revoked_at:
            return "revoked"
        return "expired" if self.expires_at < time.time() else "active"


class TokenStore:
    """Issued worker tokens, in the server's database.

    Parameters:
      db_path: the server's database: its SQLite file, a URL, or the settings naming either.
      secret: the server secret (``keys.server_secret``).
    """

    def __init__(self, db_path: Path | str | Settings, secret: bytes) -> None:
        self.db = Database(db_path)
        self.secret = secret

    def issue(self, worker: str, capability: str, ttl_s: float) -> tuple[str, TokenRecord]:
        if capability not in CAPABILITIES:
            raise AuthError(f"capability must be gpu or cpu, not {capability!r}")
        if not worker or len(worker) > 100:
            raise AuthError("a worker name of 1 to 100 characters is needed")
        now = time.time()
        record = TokenRecord(uuid.uuid4().hex, worker, capability, now, now + ttl_s)
        claims = {
            "iss": ISSUER,
            "sub": worker,
            "cap": capability,
            "iat": int(now),
            "exp": int(record.expires_at),
            "jti": record.id,
            "typ": "worker",
        }
        token = jwt.encode(claims, self.secret, algorithm="HS256")
        with self.db.transaction() as db:
            db.execute(
                worker_tokens.insert().values(
                    id=record.id,
                    worker=worker,
                    capability=capability,
                    issued_at=record.issued_at,
                    expires_at=record.expires_at,
                )
            )
        return token, record

    def signing_key(self, token_id: str) -> str:
        """The key a worker signs its messages with (given to it with its token)."""
        return derive(self.secret, "sign", token_id)

    def verify(self, token: str, capability: str | None = None) -> dict[str, Any]:
        """The claims of a valid, unrevoked worker token; AuthError with the reason otherwise."""
        try:
            claims = jwt.decode(
                token,
                self.secret,
                algorithms=["HS256"],
                issuer=ISSUER,
                options={"require": ["exp", "iat", "jti", "sub", "cap"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("worker token expired") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid worker token: {exc}") from None
        if claims.get("typ") != "worker":
            raise AuthError("not a worker token")
        record = self.get(claims["jti"])
        if record is None:
            raise AuthError("unknown worker token")
        if record.revoked_at:
            raise AuthError(f"worker token {record.id} was revoked")
        if capability is not None and claims["cap"] != capability:
            raise AuthError(f"worker token is for {claims['cap']} workers, not {capability}")
        return claims

    def check_id(self, token_id: str) -> TokenRecord:
        """The record of a known, unexpired, unrevoked token, named by its id; AuthError otherwise.

        What a signed message names: the token's id, never the token itself.
        """
        record = self.get(token_id)
        if record is None:
            raise AuthError("unknown worker token")
        if record.revoked_at:
            raise AuthError(f"worker token {record.id} was revoked")
        if record.expires_at < time.time():
            raise AuthError("worker token expired")
        return record

    def touch(self, token_id: str) -> None:
        with self.db.transaction() as db:
            db.execute(
                update(worker_tokens).where(worker_tokens.c.id == token_id).values(last_used_at=time.time())
            )

    def get(self, token_id: str) -> TokenRecord | None:
        with self.db.read() as db:
            row = db.execute(select(worker_tokens).where(worker_tokens.c.id == token_id)).first()
        return TokenRecord(**row._mapping) if row else None

    def list(self) -> list[TokenRecord]:
        with self.db.read() as db:
            rows = db.execute(select(worker_tokens).order_by(worker_tokens.c.issued_at.desc())).all()
        return [TokenRecord(**row._mapping) for row in rows]

    def revoke(self, token_id: str) -> TokenRecord:
        with self.db.transaction() as db:
            changed = db.execute(
                update(worker_tokens)
                .where(worker_tokens.c.id == token_id, worker_tokens.c.revoked_at.is_(None))
                .values(revoked_at=time.time())
            ).rowcount
        record = self.get(token_id)
        if record is None:
            raise AuthError(f"no token {token_id}")
        if not changed:
            raise AuthError(f"token {token_id} was already revoked")
        return record

    def set_broker_user(self, token_id: str, user: str) -> None:
        with self.db.transaction() as db:
            db.execute(update(worker_tokens).where(worker_tokens.c.id == token_id).values(broker_user=user))
