"""The signature of a webhook: ``Morag-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>``.

The HMAC is computed under the API key's webhook secret over ``<t>.<body>``:
the timestamp and the exact bytes of the body, as Stripe and GitHub sign theirs.
A receiver recomputes it, compares in constant time, and refuses a timestamp
too far from its clock (a replayed delivery).
"""

from __future__ import annotations

import hashlib
import hmac
import time

from pipeline.errors import PipelineError

SIGNATURE_HEADER = "Morag-Signature"
#: Seconds a receiver accepts between the signature's timestamp and its own clock (``verify``).
TOLERANCE_S = 300


class BadSignature(PipelineError):
    """A webhook's signature does not match its body, is malformed, or is too old."""


def signature(secret: str, body: bytes, timestamp: int) -> str:
    """The hex HMAC-SHA256 of ``<timestamp>.<body>`` under ``secret``."""
    return hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The ``Morag-Signature`` value for ``body`` sent at ``timestamp`` (default: now)."""
    ts = int(time.time()) if timestamp is None else timestamp
    return f"t={ts},v1={signature(secret, body, ts)}"


def verify(
    secret: str, body: bytes, header: str, tolerance_s: float = TOLERANCE_S, now: float | None = None
) -> int:
    """Check a ``Morag-Signature`` value against ``body``; its timestamp, or ``BadSignature`` saying why.

    Any ``v1`` in the header may match.
    """
    items = [part.strip().split("=", 1) for part in header.split(",")]
    if any(len(item) != 2 for item in items):
        raise BadSignature(f"malformed {SIGNATURE_HEADER}: expected t=<seconds>,v1=<hex>")
    stamps = [value for key, value in items if key == "t"]
    macs = [value for key, value in items if key == "v1"]
    if len(stamps) != 1 or not stamps[0].isdigit() or not macs:
        raise BadSignature(f"malformed {SIGNATURE_HEADER}: expected t=<seconds>,v1=<hex>")
    ts = int(stamps[0])
    age = abs((time.time() if now is None else now) - ts)
    if age > tolerance_s:
        raise BadSignature(f"signature timestamp is {age:.0f}s from now (more than {tolerance_s:g}s)")
    expected = signature(secret, body, ts)
    if not any(hmac.compare_digest(expected, mac) for mac in macs):
        raise BadSignature("signature does not match the body")
    return ts
