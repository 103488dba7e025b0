"""The audit log: one JSON object per line, rotated by size.

Records enrollments, token use and revocation, rejected messages, failed
authentication, reroutes and dead-letter actions, each with a UTC timestamp.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import time
from pathlib import Path
from typing import Any

_logger = logging.getLogger("pipeline.audit")
_logger.propagate = False
_logger.setLevel(logging.INFO)


def open_audit_log(path: Path, max_bytes: int = 10 * 1024 * 1024, backups: int = 5) -> None:
    """Send audit records to ``path`` (replacing any earlier destination)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for old in _logger.handlers:
        old.close()
    _logger.handlers[:] = [handler]


def audit(event: str, **fields: Any) -> None:
    """Record one security-relevant event; a no-op until ``open_audit_log`` was called."""
    if not _logger.handlers:
        return
    ts = time.time()
    entry = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z",
        "event": event,
        **fields,
    }
    _logger.info(json.dumps(entry, default=str, sort_keys=False))
