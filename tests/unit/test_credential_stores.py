"""Worker tokens, API keys and the server's part log, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.health import PartLog
from pipeline.security.apikeys import ApiKeyStore
from pipeline.security.tokens import AuthError, TokenStore

SECRET = b"s" * 48


def test_a_worker_token_is_verified_until_revoked(database: Path | str) -> None:
    tokens = TokenStore(database, SECRET)
    token, record = tokens.issue("gpu-box-1", "gpu", 3600)
    claims = tokens.verify(token, "gpu")
    assert (claims["sub"], claims["jti"]) == ("gpu-box-1", record.id)
    assert tokens.check_id(record.id).worker == "gpu-box-1"
    with pytest.raises(AuthError, match="not cpu"):
        tokens.verify(token, "cpu")
    tokens.touch(record.id)
    tokens.set_broker_user(record.id, "worker-gpu-box-1")
    again = tokens.get(record.id)
    assert again is not None and again.last_used_at is not None and again.broker_user == "worker-gpu-box-1"
    assert tokens.revoke(record.id).state == "revoked"
    with pytest.raises(AuthError, match="revoked"):
        tokens.verify(token)
    with pytest.raises(AuthError, match="already revoked"):
        tokens.revoke(record.id)
    with pytest.raises(AuthError, match="no token"):
        tokens.revoke("nope")


def test_tokens_are_listed_newest_first_and_an_expired_one_is_refused(database: Path | str) -> None:
    tokens = TokenStore(database, SECRET)
    _, first = tokens.issue("a", "cpu", 3600)
    _, second = tokens.issue("b", "gpu", -10)
    assert [r.id for r in tokens.list()] == [second.id, first.id]
    assert second.state == "expired"
    with pytest.raises(AuthError, match="expired"):
        tokens.check_id(second.id)


def test_an_api_key_is_checked_by_its_digest_until_revoked(database: Path | str) -> None:
    keys = ApiKeyStore(database)
    key, record = keys.create("ci", "client")
    assert keys.check(key).role == "client"
    with pytest.raises(AuthError, match="unknown API key"):
        keys.check(key[:-1] + ("A" if key[-1] != "A" else "B"))
    assert [k.id for k in keys.list()] == [record.id]
    keys.revoke(record.id)
    with pytest.raises(AuthError, match="was revoked"):
        keys.check(key)
    with pytest.raises(AuthError, match="no active API key"):
        keys.revoke(record.id)
    assert keys.list()[0].revoked_at is not None


def test_the_part_log_keeps_each_parts_latest_run(database: Path | str) -> None:
    parts = PartLog(database)
    assert parts.last("sweep") is None
    parts.mark("sweep", {"changes": 1}, at=100.0)
    parts.mark("sweep", {"changes": 2}, at=200.0)
    assert parts.last("sweep") == (200.0, {"changes": 2})


def test_every_store_shares_one_database(database: Path | str) -> None:
    """Tokens and keys written through one store are read through another opened later."""
    _, record = TokenStore(database, SECRET).issue("w", "cpu", 3600)
    key, _ = ApiKeyStore(database).create("k", "admin")
    assert TokenStore(database, SECRET).check_id(record.id).worker == "w"
    assert ApiKeyStore(database).check(key).role == "admin"
