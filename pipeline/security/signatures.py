"""Signatures on the messages workers send the server.

A worker signs each ``control`` message with the key that came with its
token: an HMAC-SHA256 over the actor, the arguments, a timestamp, a nonce and
the token id. The block a message carries names the token by its id only,
never the token itself (the token is also the worker's SFTP password, and
anyone allowed to read ``control`` would hold it). The server recomputes the
key from the token id, checks the HMAC, that its record is known, unexpired and
unrevoked, and that the nonce was never applied, so a forged, altered,
replayed or revoked message is refused.

A worker on the server's host holds the server's secret instead of a token
(the README's plain ``dramatiq pipeline.actors.cpu --queues cpu`` with the
server's settings); it signs with a key derived from that secret
(``HOST_SIGNER``), which only the server and its host's workers can compute.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from typing import Any

from pipeline.security.keys import derive
from pipeline.security.roles import AuthError

OPTION = "morag_auth"
#: The signer id of messages signed with the server's own secret (a worker on the server's host).
HOST_SIGNER = "server-host"
#: The key of a signature block that names the signer's token (by its id).
TOKEN_ID = "token_id"


def _payload(actor: str, args: Any, kwargs: Any, ts: float, nonce: str, token_id: str) -> bytes:
    return json.dumps(
        {"actor": actor, "args": args, "kwargs": kwargs, "ts": ts, "nonce": nonce, "token": token_id},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    ).encode()


def sign(
    actor: str, args: Any, kwargs: Any, token_id: str, key: str, now: float | None = None
) -> dict[str, Any]:
    """The signature block a worker attaches to a message (dated ``now``, by default the present).

    It names the worker's token by its id (``token_id``); the token itself never travels.
    """
    ts, nonce = time.time() if now is None else now, secrets.token_hex(16)
    mac = hmac.new(key.encode(), _payload(actor, args, kwargs, ts, nonce, token_id), hashlib.sha256)
    return {TOKEN_ID: token_id, "ts": ts, "nonce": nonce, "mac": mac.hexdigest()}


def host_key(secret: bytes) -> str:
    """The key workers holding the server's secret sign with."""
    return derive(secret, "sign", HOST_SIGNER)


def sign_as_host(
    actor: str, args: Any, kwargs: Any, secret: bytes, now: float | None = None
) -> dict[str, Any]:
    """The signature block of a worker that holds the server's secret (no token)."""
    ts, nonce = time.time() if now is None else now, secrets.token_hex(16)
    mac = hmac.new(
        host_key(secret).encode(), _payload(actor, args, kwargs, ts, nonce, HOST_SIGNER), hashlib.sha256
    )
    return {"host": True, "ts": ts, "nonce": nonce, "mac": mac.hexdigest()}


def check_mac(actor: str, args: Any, kwargs: Any, block: dict[str, Any], token_id: str, key: str) -> None:
    expected = hmac.new(
        key.encode(), _payload(actor, args, kwargs, block["ts"], block["nonce"], token_id), hashlib.sha256
    ).hexdigest()
    presented = str(block.get("mac", "")).encode("utf-8", "replace")  # any text, compared as bytes
    if not hmac.compare_digest(expected.encode(), presented):
        raise AuthError("bad signature: the message was altered or signed with another key")


def check_age(block: dict[str, Any], max_age_s: float) -> None:
    age = time.time() - float(block["ts"])
    if age > max_age_s:
        raise AuthError(f"message is {age:.0f}s old (more than {max_age_s:.0f}s): refused as a replay")
    if age < -60:
        raise AuthError("message is dated in the future")
