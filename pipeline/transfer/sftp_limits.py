"""The limits the embedded SFTP server holds a crowded fleet and a hostile peer to.

``SftpLimits`` gathers them (from ``pipeline.config.Settings``);
``LoginThrottle`` refuses an address that keeps failing to log in, for a
while that doubles with each further failure; ``LogLimiter`` keeps a flood
of refusals from flooding the log. Both remember a bounded number of
addresses.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from pipeline.config import Settings

#: Seconds a client has to finish the SSH handshake and log in. Our workers and
#: OpenSSH log in within a second, a few on a slow link or a loaded server; a
#: connection that has not logged in holds a slot of its address
#: (``SftpLimits.max_preauth_per_peer``), so the shorter, the sooner a flood's
#: slots come free.
HANDSHAKE_TIMEOUT_S = 15.0
#: Seconds an address is first refused once it has failed to log in too often;
#: each further failure doubles it.
LOGIN_BACKOFF_S = 1.0
#: Client addresses whose failed logins (or held-back log records) are remembered at most.
MAX_TRACKED_PEERS = 10_000
#: Seconds between two log records of the same refusal from the same address.
LOG_EVERY_S = 10.0


@dataclass(frozen=True)
class SftpLimits:
    """What the embedded SFTP server allows; the defaults are those of the settings.

    Parameters:
      max_connections: connections served at once, logged in or not; more are closed at once.
      max_preauth_per_peer: connections from one address that have not logged in
        yet; more from that address are closed at once. Logged-in connections
        are not limited per address (a fleet behind one NAT address).
      login_failures_per_peer: failed logins from one address before it is refused.
      login_backoff_s: how long the first refusal lasts; each further failure doubles it.
      login_backoff_max_s: the longest refusal.
      idle_timeout_s: a logged-in connection with no SFTP request for this long is closed.
      handshake_timeout_s: a connection that has not logged in this long after
        it was accepted is closed.
    """

    max_connections: int = 1024
    max_preauth_per_peer: int = 16
    login_failures_per_peer: int = 5
    login_backoff_s: float = LOGIN_BACKOFF_S
    login_backoff_max_s: float = 300.0
    idle_timeout_s: float = 600.0
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S

    @classmethod
    def from_settings(cls, settings: Settings) -> SftpLimits:
        return cls(
            max_connections=settings.sftp_max_connections,
            max_preauth_per_peer=settings.sftp_max_preauth_per_peer,
            login_failures_per_peer=settings.sftp_login_failures_per_peer,
            login_backoff_max_s=settings.sftp_login_backoff_max_s,
            idle_timeout_s=settings.sftp_idle_timeout_s,
        )


@dataclass
class _Failures:
    count: int
    until: float  # refused until then (monotonic seconds)


class LoginThrottle:
    """Failed logins by client address; an address that failed too often is refused for a while.

    After ``failures`` failed logins an address is refused for ``backoff_s``,
    then twice as long after each further failure, at most ``backoff_max_s``.
    A login refused while the address waits is not checked and does not
    count. A successful login forgets the address; so does a full
    ``backoff_max_s`` without a failure once its refusal has ended. At most
    ``max_peers`` addresses are remembered, the least recently failed
    forgotten first.

    Parameters:
      failures: failed logins an address may make before it is refused.
      backoff_s: the first refusal, in seconds.
      backoff_max_s: the longest refusal, in seconds.
      max_peers: addresses remembered at most.
      clock: monotonic seconds.
    """

    def __init__(
        self,
        failures: int,
        backoff_s: float,
        backoff_max_s: float,
        max_peers: int = MAX_TRACKED_PEERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures = failures
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.max_peers = max_peers
        self.clock = clock
        self._peers: OrderedDict[str, _Failures] = OrderedDict()  # least recently failed first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._peers)

    def refused_for(self, peer: str) -> float:
        """Seconds ``peer`` is still refused; 0 when it may try to log in."""
        now = self.clock()
        with self._lock:
            found = self._peers.get(peer)
            return max(0.0, found.until - now) if found is not None else 0.0

    def failed(self, peer: str) -> float:
        """Count a failed login of ``peer``; the seconds it is now refused for (0: not refused)."""
        now = self.clock()
        with self._lock:
            self._forget_old(now)
            found = self._peers.pop(peer, None)
            if found is None or now - found.until >= self.backoff_max_s:
                found = _Failures(0, now)
            found.count += 1
            backoff = 0.0
            if found.count >= self.failures:
                backoff = min(
                    self.backoff_s * 2.0 ** min(found.count - self.failures, 64), self.backoff_max_s
                )
            found.until = now + backoff
            self._peers[peer] = found
            while len(self._peers) > self.max_peers:
                self._peers.popitem(last=False)
            return backoff

    def succeeded(self, peer: str) -> None:
        """``peer`` logged in: its failures are forgotten."""
        with self._lock:
            self._peers.pop(peer, None)

    def _forget_old(self, now: float) -> None:
        """Forget, least recently failed first, addresses quiet for ``backoff_max_s`` since their refusal."""
        while self._peers:
            peer, oldest = next(iter(self._peers.items()))
            if now - oldest.until < self.backoff_max_s:
                return
            del self._peers[peer]


class LogLimiter:
    """Lets one log record of a kind through per key every ``every_s``, counting those held back.

    Parameters:
      every_s: seconds between two records of the same key.
      max_keys: keys remembered at most (the least recently logged forgotten first).
      clock: monotonic seconds.
    """

    def __init__(
        self,
        every_s: float = LOG_EVERY_S,
        max_keys: int = MAX_TRACKED_PEERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.every_s = every_s
        self.max_keys = max_keys
        self.clock = clock
        self._keys: OrderedDict[Hashable, tuple[float, int]] = OrderedDict()  # logged at, held back since
        self._lock = threading.Lock()

    def allow(self, key: Hashable) -> int | None:
        """None to hold this record back; else how many of its key were held back before it."""
        now = self.clock()
        with self._lock:
            found = self._keys.get(key)
            if found is not None and now - found[0] < self.every_s:
                self._keys[key] = (found[0], found[1] + 1)
                return None
            self._keys.pop(key, None)
            self._keys[key] = (now, 0)
            while len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
            return found[1] if found is not None else 0
