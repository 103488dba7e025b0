"""Per-task transfer grants: what a worker may read and write over SFTP for one task.

The server signs a grant into every task message: the task's input files to
read, its output folder to read and write, and an expiry. A worker presents
the grants of the tasks it holds on its SFTP session; the SFTP server lets it
touch nothing else, and nothing once a grant has expired.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import jwt

from pipeline.security.tokens import ISSUER, AuthError

GRANT_TYPE = "grant"


def output_folder(task_id: str) -> str:
    return f"tasks/{task_id}/output"


def issue_grant(secret: bytes, task_id: str, inputs: list[str], ttl_s: float) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "typ": GRANT_TYPE,
        "task": task_id,
        "read": inputs,
        "write": output_folder(task_id),
        "iat": now,
        "exp": now + int(ttl_s),
    }
    return jwt.encode(claims, secret, algorithm="HS256")


@dataclass(frozen=True)
class TaskGrant:
    """A verified grant."""

    task: str
    read: tuple[str, ...]
    write: str
    expires_at: float

    def allows(self, path: str, *, write: bool) -> bool:
        if time.time() >= self.expires_at:
            return False
        inside_output = path == self.write or path.startswith(self.write + "/")
        if write:
            return inside_output
        # Reading: the inputs, the output folder, and the task folder holding them.
        return inside_output or path in self.read or path == f"tasks/{self.task}"


def verify_grant(secret: bytes, token: str) -> TaskGrant:
    """The grant a token carries; AuthError when forged, expired or not a grant."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token, secret, algorithms=["HS256"], issuer=ISSUER,
            options={"require": ["exp", "task", "read", "write"]},
        )  # fmt: skip
    except jwt.ExpiredSignatureError:
        raise AuthError("transfer grant expired") from None
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid transfer grant: {exc}") from None
    if claims.get("typ") != GRANT_TYPE:
        raise AuthError("not a transfer grant")
    task = str(claims["task"])
    if claims["write"] != output_folder(task) or not all(
        isinstance(p, str) and p.startswith(f"tasks/{task}/input/") for p in claims["read"]
    ):
        raise AuthError("transfer grant names paths outside its task")
    return TaskGrant(task, tuple(claims["read"]), claims["write"], float(claims["exp"]))


class SessionGrants:
    """The grants a worker presented on one SFTP session; allows what any of them allows.

    Parameters:
      secret: the server secret grants are verified with.
    """

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self._grants: dict[str, TaskGrant] = {}
        self._lock = threading.Lock()

    def add(self, token: str) -> TaskGrant:
        grant = verify_grant(self.secret, token)
        with self._lock:
            self._grants[grant.task] = grant
        return grant

    def allows(self, path: str, *, write: bool) -> bool:
        with self._lock:
            grants = list(self._grants.values())
        return any(g.allows(path, write=write) for g in grants)
