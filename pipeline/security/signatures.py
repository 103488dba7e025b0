"""Signatures on the messages workers send the server.

A worker signs each ``control`` message with the key that came with its
token: an HMAC-SHA256 over the actor, the arguments, a timestamp, a nonce and
the token id. The server recomputes the key from the token id, checks the
token (valid, unrevoked), the HMAC, the age of the message and that the nonce
was never seen, so a forged, altered, replayed, expired or revoked message is
refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Any

from pipeline.db import Database
from pipeline.security.tokens import AuthError

OPTION = "morag_auth"


def _payload(actor: str, args: Any, kwargs: Any, ts: float, nonce: str, token_id: str) -> bytes:
    return json.dumps(
        {"actor": actor, "args": args, "kwargs": kwargs, "ts": ts, "nonce": nonce, "token": token_id},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    ).encode()


def sign(
    actor: str, args: Any, kwargs: Any, token: str, token_id: str, key: str, now: float | None = None
) -> dict[str, Any]:
    """The signature block a worker attaches to a message (dated ``now``, by default the present)."""
    ts, nonce = time.time() if now is None else now, secrets.token_hex(16)
    mac = hmac.new(key.encode(), _payload(actor, args, kwargs, ts, nonce, token_id), hashlib.sha256)
    return {"token": token, "ts": ts, "nonce": nonce, "mac": mac.hexdigest()}


def check_mac(actor: str, args: Any, kwargs: Any, block: dict[str, Any], token_id: str, key: str) -> None:
    expected = hmac.new(
        key.encode(), _payload(actor, args, kwargs, block["ts"], block["nonce"], token_id), hashlib.sha256
    ).hexdigest()
    if not hmac.compare_digest(expected, str(block.get("mac", ""))):
        raise AuthError("bad signature: the message was altered or signed with another key")


def check_age(block: dict[str, Any], max_age_s: float) -> None:
    age = time.time() - float(block["ts"])
    if age > max_age_s:
        raise AuthError(f"message is {age:.0f}s old (more than {max_age_s:.0f}s): refused as a replay")
    if age < -60:
        raise AuthError("message is dated in the future")


class NonceStore:
    """Nonces seen within the replay window, in the server's database.

    Parameters:
      db_path: the server's database file.
      window_s: how long a nonce is remembered (the message age limit).
    """

    def __init__(self, db_path: Path, window_s: float) -> None:
        self.db = Database(
            db_path, "CREATE TABLE IF NOT EXISTS seen_nonces (nonce TEXT PRIMARY KEY, ts REAL NOT NULL);"
        )
        self.window_s = window_s
        self._added = 0

    def first_time(self, nonce: str) -> bool:
        """Record the nonce; False when it was seen before."""
        now = time.time()
        with self.db.transaction() as db:
            try:
                db.execute("INSERT INTO seen_nonces (nonce, ts) VALUES (?, ?)", (nonce, now))
            except sqlite3.IntegrityError:
                return False
            self._added += 1
            if self._added % 500 == 0:
                db.execute("DELETE FROM seen_nonces WHERE ts < ?", (now - 2 * self.window_s,))
        return True
