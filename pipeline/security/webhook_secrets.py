"""The webhook secret of each API key: what signs the webhooks of the tasks it submitted.

A secret is derived from the server secret, the key's id and a version
(``whsec_<64 hex>``), so the database holds none: only each key's version,
which ``rotate`` raises. A request without a key (development mode) is signed
with the secret of the pseudo-key ``development``. Changing the server secret
changes every webhook secret, as it does every worker's signing key.
"""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import select

from pipeline.config import Settings
from pipeline.db import Database
from pipeline.schema import api_keys, webhook_secret_versions
from pipeline.security.keys import derive
from pipeline.security.roles import AuthError

PREFIX = "whsec_"
#: The key id of requests without an API key (development mode).
DEVELOPMENT = "development"


class WebhookSecrets:
    """Webhook secrets of API keys.

    Parameters:
      db_path: the server's database: its SQLite file, a URL, or the settings naming either.
      secret: the server secret (``keys.server_secret``).
    """

    def __init__(self, db_path: Path | str | Settings, secret: bytes) -> None:
        self.db = Database(db_path)
        self.secret = secret

    def version(self, key_id: str) -> int:
        """The version of the key's secret (1 until it is rotated)."""
        with self.db.read() as db:
            found = db.execute(
                select(webhook_secret_versions.c.version).where(webhook_secret_versions.c.key_id == key_id)
            ).scalar()
        return int(found) if found is not None else 1

    def secret_of(self, key_id: str | None) -> str:
        """The secret that signs the webhooks of ``key_id``'s tasks now (None: development mode)."""
        key_id = key_id or DEVELOPMENT
        return PREFIX + derive(self.secret, "webhook", f"{key_id}:{self.version(key_id)}")

    def rotate(self, key_id: str) -> str:
        """A new secret for ``key_id``; the old one signs nothing from now on."""
        table = webhook_secret_versions
        with self.db.transaction() as db:
            insert = self.db.insert(table).values(key_id=key_id, version=2, rotated_at=time.time())
            db.execute(
                insert.on_conflict_do_update(
                    index_elements=["key_id"],
                    set_={"version": table.c.version + 1, "rotated_at": insert.excluded.rotated_at},
                )
            )
        return self.secret_of(key_id)

    def key_id(self, name_or_id: str) -> str:
        """The id of the active API key with this id or name (``development``: the pseudo-key);
        AuthError when none or several match."""
        c = api_keys.c
        with self.db.read() as db:
            rows = db.execute(
                select(c.id, c.name)
                .where(c.revoked_at.is_(None), (c.id == name_or_id) | (c.name == name_or_id))
                .order_by(c.created_at)
            ).all()
        by_id = [row.id for row in rows if row.id == name_or_id]
        if by_id:
            return by_id[0]
        if len(rows) > 1:
            ids = ", ".join(row.id for row in rows)
            raise AuthError(f"several active API keys are named {name_or_id!r} ({ids}): name one by its id")
        if rows:
            return str(rows[0].id)
        if name_or_id == DEVELOPMENT:
            return DEVELOPMENT
        raise AuthError(f"no active API key with the id or name {name_or_id!r} (see `apikey list`)")
