"""Per-task transfer grants: what a worker may read and write over SFTP for one task.

The server signs a grant into every task message: the task's input files to
read, its output folder to read and write, and an expiry. A worker presents
the grants of the tasks it holds on its SFTP session; the SFTP server lets it
touch nothing else.

Only the server holds the secret that signs grants, so a worker cannot renew
one. Instead the server's ``GrantCheck`` keeps a grant open for as long as its
task is open: a grant whose task the store holds as queued or running is
honoured whatever its age (a task may wait in a backlog longer than any
expiry), and a grant whose task is done, failed or canceled is closed at
once, on presentation and on every later use. The grant's own expiry
(``MORAG_GRANT_TTL_S``) decides only for tasks the store does not know.

A grant is bound to the workers it was issued to: it names the queue its task
was routed to (``cap``: gpu or cpu), and only a worker whose token has that
capability may present it. When the task is rerouted since (the sweep moves
it, or a GPU worker falls back to the CPU queue), a worker of the new queue
may present it too: the task store's route decides, not the grant's word.
Every presentation and every use also asks whether the worker's token still
stands (``TokenStanding``): a revoked token opens nothing.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.logs import get_logger
from pipeline.security.roles import CAPABILITIES, ISSUER, AuthError

logger = get_logger(__name__)

GRANT_TYPE = "grant"
#: Task states in which a grant is closed (the values of ``pipeline.store.FINAL_STATES``).
CLOSED_STATES = frozenset({"done", "failed", "canceled"})
#: Seconds a task state found open is reused.
STATE_CACHE_S = 2.0
#: Task states kept in that cache at most.
STATE_CACHE_SIZE = 10_000

#: The state of a task by its id, or None when the store does not know it.
TaskStateLookup = Callable[[str], str | None]
#: The queue a task is routed to now (gpu or cpu) by its id, or None when the store does not know it.
TaskRouteLookup = Callable[[str], str | None]
#: Whether a session's worker token still stands: None if it does, else why not (revoked, expired).
TokenStanding = Callable[[], str | None]
#: The capability a grant that names none is read as (grants signed before grants named one).
DEFAULT_CAPABILITY = "gpu"


def output_folder(task_id: str) -> str:
    return f"tasks/{task_id}/output"


def issue_grant(
    secret: bytes, task_id: str, inputs: list[str], ttl_s: float, capability: str = DEFAULT_CAPABILITY
) -> str:
    """A signed grant to ``inputs`` and the task's output folder, for workers of ``capability``.

    ``capability`` is the queue the task is routed to (gpu or cpu): only a
    worker whose token has it may present the grant, unless the task store
    routes the task elsewhere since (see ``GrantCheck``).
    """
    if capability not in CAPABILITIES:
        raise ValueError(f"a grant's capability must be gpu or cpu, not {capability!r}")
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "typ": GRANT_TYPE,
        "task": task_id,
        "read": inputs,
        "write": output_folder(task_id),
        "cap": capability,
        "iat": now,
        "exp": now + int(ttl_s),
    }
    import jwt  # here, not at the top: PyJWT loads cryptography, which a worker's boot can do without

    return jwt.encode(claims, secret, algorithm="HS256")


#: What the refusal of a grant whose task ended says (the worker tells it from other refusals).
ENDED = "has ended"


class GrantRefused(AuthError):
    """The server will not honour a grant (expired, closed, forged or malformed).

    Parameters:
      reason: the one-line reason, sent to the worker.
      retryable: True when presenting the same grant later may succeed
        (the task's state could not be read just now).
    """

    def __init__(self, reason: str, *, retryable: bool = False) -> None:
        super().__init__(reason)
        self.retryable = retryable


@dataclass(frozen=True)
class TaskGrant:
    """A grant whose signature was verified (its expiry is ``GrantCheck``'s business)."""

    task: str
    read: tuple[str, ...]
    write: str
    expires_at: float
    capability: str = DEFAULT_CAPABILITY

    @property
    def expired(self) -> bool:
        return time.time() >= self.expires_at

    def covers(self, path: str, *, write: bool) -> bool:
        """Whether ``path`` is one of the task's paths (for writing: inside its output folder)."""
        inside_output = path == self.write or path.startswith(self.write + "/")
        if write:
            return inside_output
        # Reading: the inputs, the output folder, and the task folder holding them.
        return inside_output or path in self.read or path == f"tasks/{self.task}"

    def allows(self, path: str, *, write: bool) -> bool:
        """``covers``, until the grant expires (the rule where no task store is consulted)."""
        return not self.expired and self.covers(path, write=write)


#: What a task id may be (the server makes uuid4 hex ids): one plain path segment.
TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _plain(path: str) -> bool:
    """A store path with no ``.``/``..`` segment, no empty segment and no NUL: it means what it says."""
    return "\x00" not in path and all(part not in ("", ".", "..") for part in path.split("/"))


def verify_grant(secret: bytes, token: str, *, check_expiry: bool = True) -> TaskGrant:
    """The grant a token carries; GrantRefused when forged, malformed or (with ``check_expiry``) expired."""
    import jwt  # see issue_grant

    try:
        claims: dict[str, Any] = jwt.decode(
            token, secret, algorithms=["HS256"], issuer=ISSUER,
            options={"require": ["exp", "task", "read", "write"], "verify_exp": check_expiry},
        )  # fmt: skip
    except jwt.ExpiredSignatureError:
        raise GrantRefused("transfer grant expired") from None
    except jwt.InvalidTokenError as exc:
        raise GrantRefused(f"invalid transfer grant: {exc}") from None
    if claims.get("typ") != GRANT_TYPE:
        raise GrantRefused("not a transfer grant")
    task, read, expires = claims["task"], claims["read"], claims["exp"]
    if not isinstance(task, str) or not TASK_ID.fullmatch(task):
        raise GrantRefused("transfer grant names no valid task")
    if not isinstance(expires, int | float):
        raise GrantRefused("transfer grant has no valid expiry")
    inputs = f"tasks/{task}/input/"
    if (
        claims["write"] != output_folder(task)
        or not isinstance(read, list)
        or not all(isinstance(p, str) and p.startswith(inputs) and _plain(p) for p in read)
    ):
        raise GrantRefused("transfer grant names paths outside its task")
    capability = claims.get("cap", DEFAULT_CAPABILITY)
    if capability not in CAPABILITIES:
        raise GrantRefused("transfer grant names no known capability (gpu or cpu)")
    return TaskGrant(task, tuple(read), claims["write"], float(expires), capability)


class GrantCheck:
    """Decides whether a grant opens its task now: signed by the server, and its task still open.

    A grant of a task the store holds as queued or running is open whatever
    its age; a grant of a done, failed or canceled task is closed; a grant of
    a task the store does not know (or with no store at all) is open until it
    expires. A grant presented is checked against the store as it is now; on
    later uses an open state is reused for ``STATE_CACHE_S`` seconds (a worker
    opens a few files a second), a closed one is read again each time, since a
    dead-letter retry may queue the task again.

    A grant presented by a worker of another capability than the grant's is
    refused, unless ``task_route`` says the task is routed to the worker's
    queue now (it was rerouted after the grant was signed). While the store
    holds the task open that refusal is retryable: a task's message is moved
    before its move is recorded (the sweep records it just after; a GPU
    worker's fallback reaches the server as a report), so a worker of the new
    queue may present the grant a moment before the store says so.

    Parameters:
      secret: the server secret grants are signed with.
      task_state: the state of a task by id (None when unknown), or None to go by expiry alone.
      task_route: the queue a task is routed to now, or None to hold every grant to its own capability.
    """

    def __init__(
        self,
        secret: bytes,
        task_state: TaskStateLookup | None = None,
        task_route: TaskRouteLookup | None = None,
    ) -> None:
        self.secret = secret
        self.task_state = task_state
        self.task_route = task_route
        self._states: dict[str, tuple[float, str | None]] = {}
        self._lock = threading.Lock()

    def verify(self, token: str, capability: str | None = None) -> TaskGrant:
        """The grant ``token`` carries, if it opens its task now to a worker of ``capability``
        (None: any); GrantRefused with the reason otherwise."""
        grant = verify_grant(self.secret, token, check_expiry=self.task_state is None)
        self.check(grant, fresh=True)
        if capability is not None and grant.capability != capability:
            self._check_route(grant, capability)
        return grant

    def _check_route(self, grant: TaskGrant, capability: str) -> None:
        """Return if the store routes the task to ``capability`` workers now; GrantRefused otherwise."""
        route = None
        if self.task_route is not None:
            try:
                route = self.task_route(grant.task)
            except Exception as exc:  # the store is busy or down: the worker tries again later
                logger.warning(
                    "cannot read a task's route for its grant",
                    extra={"task_id": grant.task, "error": str(exc)},
                )
                raise GrantRefused(f"cannot check task {grant.task} now; try again", retryable=True) from None
        if route != capability:
            logger.warning(
                "transfer grant of another capability",
                extra={
                    "task_id": grant.task,
                    "grant": grant.capability,
                    "capability": capability,
                    "route": route,
                },
            )
            raise GrantRefused(
                f"transfer grant of task {grant.task} is for {grant.capability} workers, not {capability}"
                f" (the task is routed to {route or 'no queue the server knows'})",
                retryable=route is not None,
            )

    def check(self, grant: TaskGrant, *, fresh: bool = False) -> None:
        """Return if ``grant`` still opens its task; GrantRefused with the reason otherwise.

        With ``fresh`` the task's state is read from the store, never from the cache.
        """
        if self.task_state is None:
            if grant.expired:
                raise GrantRefused("transfer grant expired")
            return
        state = self._state(grant.task, fresh)
        if state in CLOSED_STATES:
            raise GrantRefused(f"task {grant.task} {ENDED} ({state}): its transfer grant is closed")
        if state is None and grant.expired:
            raise GrantRefused(f"transfer grant expired (task {grant.task} is unknown to the server)")

    def _state(self, task_id: str, fresh: bool) -> str | None:
        now = time.monotonic()
        with self._lock:
            cached = self._states.get(task_id)
        if not fresh and cached is not None and now - cached[0] < STATE_CACHE_S:
            return cached[1]
        assert self.task_state is not None
        try:
            state = self.task_state(task_id)
        except Exception as exc:  # the store is busy or down: the worker tries again later
            logger.warning(
                "cannot read a task's state for its grant", extra={"task_id": task_id, "error": str(exc)}
            )
            raise GrantRefused(f"cannot check task {task_id} now; try again", retryable=True) from None
        found = None if state is None else str(state)
        with self._lock:
            if found in CLOSED_STATES:  # never kept: a closed task may be queued again (a dead-letter retry)
                self._states.pop(task_id, None)
                return found
            if len(self._states) >= STATE_CACHE_SIZE:
                self._states = {k: v for k, v in self._states.items() if now - v[0] < STATE_CACHE_S}
            self._states[task_id] = (now, found)
        return found


class SessionGrants:
    """The grants a worker presented on one SFTP session; allows what any open one allows.

    Every use checks the grant again: a grant whose task ended since it was
    presented is dropped from the session. Every presentation and every use
    first asks whether the worker's token still stands: once it is revoked,
    the session reaches nothing.

    Parameters:
      check: decides whether a grant opens its task now.
      owner: who presented them (the worker's name, for logs).
      capability: the worker's capability (gpu or cpu), or None to accept grants of any.
      standing: whether the worker's token still stands, or None when nothing can revoke it.
    """

    def __init__(
        self,
        check: GrantCheck,
        owner: str = "",
        capability: str | None = None,
        standing: TokenStanding | None = None,
    ) -> None:
        self.check = check
        self.owner = owner
        self.capability = capability
        self.standing = standing
        self._grants: dict[str, TaskGrant] = {}
        self._lock = threading.Lock()

    def revoked(self) -> str | None:
        """Why the worker's token no longer stands, or None while it does."""
        return self.standing() if self.standing is not None else None

    def add(self, token: str) -> TaskGrant:
        """Verify and keep a grant; GrantRefused with the reason when it does not open its task."""
        reason = self.revoked()
        if reason is not None:
            raise GrantRefused(reason)
        grant = self.check.verify(token, self.capability)
        with self._lock:
            self._grants[grant.task] = grant
        return grant

    def release(self, task_id: str) -> bool:
        """Forget the grant of ``task_id`` (the worker is done with it); whether one was held."""
        with self._lock:
            return self._grants.pop(task_id, None) is not None

    def tasks(self) -> list[str]:
        """The tasks this session holds grants for."""
        with self._lock:
            return list(self._grants)

    def allows(self, path: str, *, write: bool) -> bool:
        if self.revoked() is not None:
            return False
        with self._lock:
            grants = list(self._grants.values())
        for grant in grants:
            if not grant.covers(path, write=write):
                continue
            try:
                self.check.check(grant)
            except GrantRefused as exc:
                if exc.retryable and not grant.expired:
                    return True  # the store cannot say now: the grant's own expiry decides
                if not exc.retryable:
                    self._drop(grant, str(exc))
                continue
            return True
        return False

    def _drop(self, grant: TaskGrant, reason: str) -> None:
        with self._lock:
            if self._grants.get(grant.task) is not grant:
                return
            del self._grants[grant.task]
        logger.info(
            "sftp grant closed", extra={"worker": self.owner, "task_id": grant.task, "reason": reason}
        )
