"""API authentication: API keys with roles, worker tokens refused, failures rate-limited."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Depends, HTTPException, Request, params

from pipeline.logs import get_logger
from pipeline.security.apikeys import ApiKeyStore, allows
from pipeline.security.audit import audit
from pipeline.security.ratelimit import FailureLimiter
from pipeline.security.tokens import AuthError, TokenStore

logger = get_logger(__name__)

_WELL_FORMED = re.compile(r"mpk_([0-9a-f]{12})_[A-Za-z0-9_-]{1,128}")


@dataclass(frozen=True)
class Principal:
    """Who made a request."""

    name: str
    role: str
    key_id: str | None = None


class Authenticator:
    """Checks the API key of each request against the role an endpoint needs.

    The key comes as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.
    In development mode a request without a key acts as admin.

    Parameters:
      keys: the API key store.
      tokens: worker tokens, to tell a worker token apart from a bad key.
      limiter: counts failures per presented key and address, and per address for garbage.
      dev_mode: let requests without a key through as admin.
    """

    def __init__(
        self, keys: ApiKeyStore, tokens: TokenStore, limiter: FailureLimiter, dev_mode: bool = False
    ) -> None:
        self.keys = keys
        self.tokens = tokens
        self.limiter = limiter
        self.dev_mode = dev_mode

    def require(self, role: str) -> Callable[[Request], Principal]:
        """A FastAPI dependency admitting principals with at least ``role``."""

        def dependency(request: Request) -> Principal:
            principal = self.authenticate(request)
            request.state.principal = principal  # for endpoints that audit who acted
            if not allows(principal.role, role):
                audit("auth.forbidden", key=principal.key_id, role=principal.role, needed=role,
                      path=request.url.path)  # fmt: skip
                raise HTTPException(403, f"this needs the {role} role; your key has {principal.role}")
            return principal

        return dependency

    def authenticate(self, request: Request) -> Principal:
        address = request.client.host if request.client else "?"
        key = _presented_key(request)
        key_id = key_id_of(key)
        # A well-formed key's failures count against that key from that address only, so one bad
        # key behind a NAT locks out no one else; garbage (no key, a malformed key, a worker
        # token) counts against the whole address, and blocks it.
        bucket = (address, key_id) if key_id else address
        wait = max(self.limiter.retry_after(address), self.limiter.retry_after(bucket))
        if wait:
            raise HTTPException(
                429, "too many failed authentications; try again later",
                headers={"Retry-After": str(int(wait) + 1)},
            )  # fmt: skip
        if key is None:
            if self.dev_mode:
                return Principal("development", "admin")
            self._fail(bucket, request, "no API key")
        try:
            record = self.keys.check(key)
        except AuthError as exc:
            if key.count(".") == 2 and self._is_worker_token(key):
                audit("auth.worker_token_on_api", client=address, path=request.url.path)
                self.limiter.failed(bucket)
                raise HTTPException(403, "worker tokens cannot use the API; use an API key") from None
            self._fail(bucket, request, str(exc))
        return Principal(record.name, record.role, record.id)

    def _is_worker_token(self, token: str) -> bool:
        try:
            self.tokens.verify(token)
            return True
        except AuthError:
            return False

    def _fail(self, bucket: str | tuple[str, str], request: Request, reason: str) -> None:
        self.limiter.failed(bucket)
        address, key_id = bucket if isinstance(bucket, tuple) else (bucket, None)
        audit("auth.failed", client=address, key=key_id, path=request.url.path, reason=reason)
        logger.warning("authentication failed", extra={"client": address, "key": key_id, "reason": reason})
        raise HTTPException(401, f"authentication required: {reason}", headers={"WWW-Authenticate": "Bearer"})


@dataclass(frozen=True)
class Access:
    """The dependencies that guard each kind of endpoint, for a router's ``dependencies=``.

    Parameters:
      read: looking (the readonly role).
      write: submitting and canceling tasks (the client role).
      admin: changing dead letters, asking for a sweep (the admin role).
    """

    read: list[params.Depends]
    write: list[params.Depends]
    admin: list[params.Depends]

    @classmethod
    def of(cls, auth: Authenticator) -> Access:
        """The three guards of ``auth``."""
        return cls(
            read=[Depends(auth.require("readonly"))],
            write=[Depends(auth.require("client"))],
            admin=[Depends(auth.require("admin"))],
        )


def acting(request: Request) -> Principal | None:
    """Who made ``request``, once a guard let it through (for endpoints that audit who acted)."""
    return getattr(request.state, "principal", None)


def acting_name(request: Request) -> str | None:
    """The name of who made ``request``, as the audit log records it."""
    principal = acting(request)
    return principal.name if principal else None


def key_id_of(key: str | None) -> str | None:
    """The id of a well-formed API key (``mpk_<12 hex>_<secret>``), or None for anything else."""
    found = _WELL_FORMED.fullmatch(key or "")
    return found.group(1) if found else None


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.headers.get("x-api-key") or None
