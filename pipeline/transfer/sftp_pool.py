"""A worker process's SSH connections to the SFTP server, shared by its threads.

A ``ConnectionPool`` keeps at most ``size`` SSH connections to one server,
logged in with one set of credentials. A transfer borrows one SFTP channel
(a ``Lease``; SSH carries many channels on one connection) and gives it back
when done: on the connection with the fewest channels lent, a new connection
being opened only while fewer than ``size`` are open and every open one is
busy; a channel given back in good order is lent again. A connection with no
channel lent for ``idle_s`` is closed by the process's reaper thread; one found
dead (a server restart, a cut, the server's own idle timeout) is dropped, and
the next lease opens another.

The server holds transfer grants per SSH connection, so each ``Connection``
records the tasks whose grants were presented on it and which holders (the
per-thread transports) hold them: ``grants``, guarded by ``grant_lock``, under
which grants are also presented and released, so that a grant is released
only once its last holder on that connection lets it go.

Pools live in one process: ``pool_for`` hands out the pool of a key in the
process that asks, and a forked child (Dramatiq forks its worker processes)
starts with none, never touching its parent's connections.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Hashable
from contextlib import suppress
from typing import Generic, Protocol, TypeVar

import paramiko

from pipeline.logs import get_logger

logger = get_logger(__name__)


class Channel(Protocol):
    """An SFTP channel as the pool lends it."""

    @property
    def active(self) -> bool: ...

    def close(self) -> None: ...


C = TypeVar("C", bound=Channel)


class Connection(Generic[C]):
    """One pooled SSH connection and the channels it lends.

    Parameters:
      transport: the logged-in SSH connection.
    """

    def __init__(self, transport: paramiko.Transport) -> None:
        self.transport = transport
        #: Channels lent now.
        self.lent = 0
        #: When the last lent channel came back (``time.monotonic``).
        self.idle_since = time.monotonic()
        #: Channels given back in good order, lent again before a new one is opened.
        self.free: list[C] = []
        #: Task id -> the holders of its grant, for each grant presented on this connection.
        self.grants: dict[str, set[object]] = {}
        #: Held while ``grants`` is read or changed, and while a grant is presented or released.
        self.grant_lock = threading.Lock()
        self.closed = False

    @property
    def alive(self) -> bool:
        return not self.closed and self.transport.is_active()

    def close(self) -> None:
        self.closed = True
        for channel in self.free:
            with suppress(Exception):
                channel.close()
        self.free = []
        with suppress(Exception):
            self.transport.close()


class Lease(Generic[C]):
    """A channel lent to one transfer, and the connection it rides.

    Parameters:
      connection: the pooled connection.
      channel: the SFTP channel on it.
    """

    def __init__(self, connection: Connection[C], channel: C) -> None:
        self.connection = connection
        self.channel = channel

    @property
    def active(self) -> bool:
        return self.connection.alive and self.channel.active


class ConnectionPool(Generic[C]):
    """At most ``size`` SSH connections to one server, their channels lent to transfers.

    Parameters:
      size: connections open at most.
      idle_s: a connection with no channel lent for this long is closed.
      connect: opens and logs in a new SSH connection.
      open_channel: opens an SFTP channel on a connection.
      name: who the connections log in as, for logs.
    """

    def __init__(
        self,
        size: int,
        idle_s: float,
        connect: Callable[[], paramiko.Transport],
        open_channel: Callable[[paramiko.Transport], C],
        name: str = "",
    ) -> None:
        self.size = size
        self.idle_s = idle_s
        self.name = name
        self._connect = connect
        self._open_channel = open_channel
        self._connections: list[Connection[C]] = []
        self._opening = 0
        self._cond = threading.Condition()
        self._closed = False
        #: Transports attached (``pool_for``); the pool closes when the last one detaches.
        self.users = 0
        #: Called with the time a connection that has no channel lent is due to close (wakes the reaper).
        self.on_idle: Callable[[float], None] = lambda due: None

    def connections(self) -> list[Connection[C]]:
        """The connections open now."""
        with self._cond:
            return [c for c in self._connections if c.alive]

    def lease(self, prefer: Connection[C] | None = None, connect: bool = True) -> Lease[C] | None:
        """A channel on the least-loaded connection (``prefer`` among equals), opening one if allowed.

        With ``connect`` false, None when no connection is open. A connection
        that turns out dead as a channel is opened on it is dropped and the
        lease tried again; errors of a new connection are raised.
        """
        while True:
            chosen = self._choose(prefer, connect)
            if chosen is None:
                return None
            connection, channel = chosen
            fresh = connection is None
            if connection is None:
                connection = self._open()
            if channel is not None:
                return Lease(connection, channel)
            try:
                return Lease(connection, self._open_channel(connection.transport))
            except paramiko.ChannelException:
                self._returned(connection)  # the server refused one more channel: the connection is fine
                raise
            except BaseException:
                self._returned(connection)
                self.discard(connection)
                if fresh:
                    raise
                # a connection that had died unnoticed (a cut, the server's idle timeout): try again

    def lease_on(self, connection: Connection[C]) -> Lease[C] | None:
        """A channel on ``connection`` itself; None if it is no longer open."""
        with self._cond:
            if connection not in self._connections or not connection.alive:
                return None
            connection.lent += 1
            channel = self._take_free(connection)
        if channel is not None:
            return Lease(connection, channel)
        try:
            return Lease(connection, self._open_channel(connection.transport))
        except BaseException:
            self._returned(connection)
            raise

    def give_back(self, lease: Lease[C], reuse: bool) -> None:
        """The transfer is done with the channel: lent again if ``reuse`` and still good, closed otherwise."""
        connection = lease.connection
        keep = False
        with self._cond:
            if reuse and connection in self._connections and lease.active:
                connection.free.append(lease.channel)
                keep = True
        if not keep:
            with suppress(Exception):
                lease.channel.close()
        self._returned(connection)

    def discard(self, connection: Connection[C]) -> None:
        """Close a connection found broken, and lend nothing more on it."""
        with self._cond:
            if connection in self._connections:
                self._connections.remove(connection)
        connection.close()

    def reap(self, now: float) -> float | None:
        """Close the connections idle for ``idle_s`` and those found dead; when the next one is due."""
        closing: list[Connection[C]] = []
        due: float | None = None
        with self._cond:
            for connection in list(self._connections):
                if not connection.alive:
                    closing.append(connection)
                elif connection.lent == 0:
                    deadline = connection.idle_since + self.idle_s
                    if deadline <= now:
                        closing.append(connection)
                    else:
                        due = deadline if due is None else min(due, deadline)
            for connection in closing:
                self._connections.remove(connection)
        for connection in closing:
            if connection.alive:
                logger.info(
                    "sftp pool closed an idle connection",
                    extra={"worker": self.name, "idle_s": self.idle_s},
                )
            connection.close()
        return due

    def close(self) -> None:
        """Close every connection; leases still out are closed as they come back."""
        with self._cond:
            self._closed = True
            connections, self._connections = self._connections, []
            self._cond.notify_all()
        for connection in connections:
            connection.close()

    def _choose(
        self, prefer: Connection[C] | None, connect: bool
    ) -> tuple[Connection[C] | None, C | None] | None:
        """A connection (lent once more) and a free channel on it; (None, None) when a new
        connection is to be opened (counted in ``_opening``); None when none is open and
        ``connect`` is false."""
        with self._cond:
            while True:
                if self._closed:
                    raise paramiko.SSHException("the SFTP connection pool is closed")
                self._connections = [c for c in self._connections if c.alive]
                open_ = self._connections
                may_open = connect and len(open_) + self._opening < self.size
                if open_ and not (may_open and all(c.lent for c in open_)):
                    connection = min(open_, key=lambda c: (c.lent, c is not prefer))
                    connection.lent += 1
                    return connection, self._take_free(connection)
                if may_open:  # none open, or every open one busy: open another
                    self._opening += 1
                    return None, None
                if not connect:
                    return None
                self._cond.wait()  # every connection allowed is being opened

    def _open(self) -> Connection[C]:
        """Open a new connection, counted in ``_opening`` by ``_choose``; lent once."""
        try:
            transport = self._connect()
        except BaseException:
            with self._cond:
                self._opening -= 1
                self._cond.notify_all()
            raise
        connection: Connection[C] = Connection(transport)
        connection.lent = 1
        with self._cond:
            self._opening -= 1
            closed = self._closed
            if not closed:
                self._connections.append(connection)
            self._cond.notify_all()
        if closed:
            connection.close()
            raise paramiko.SSHException("the SFTP connection pool is closed")
        logger.info(
            "sftp pool opened a connection",
            extra={"worker": self.name, "connections": len(self._connections), "size": self.size},
        )
        return connection

    def _take_free(self, connection: Connection[C]) -> C | None:
        while connection.free:
            channel = connection.free.pop()
            if channel.active:
                return channel
            with suppress(Exception):
                channel.close()
        return None

    def _returned(self, connection: Connection[C]) -> None:
        with self._cond:
            connection.lent -= 1
            idle = connection.lent == 0
            if idle:
                connection.idle_since = time.monotonic()
        if idle:
            self.on_idle(connection.idle_since + self.idle_s)


class _Pools:
    """The pools of one process, and the reaper thread that closes their idle connections."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.pools: dict[Hashable, ConnectionPool] = {}
        self.lock = threading.Lock()
        self._wake = threading.Event()
        self._reaper: threading.Thread | None = None
        #: When the reaper wakes next on its own; None while it computes, or has nothing to wait for.
        self._due: float | None = None

    def wake(self, due: float) -> None:
        """A connection is due to close at ``due``: wake the reaper unless it wakes by then anyway."""
        with self.lock:
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="sftp-pool-reaper", daemon=True)
                self._reaper.start()
            if self._due is not None and self._due <= due:
                return
        self._wake.set()

    def _reap(self) -> None:
        while True:
            self._wake.clear()
            with self.lock:
                self._due = None
                pools = list(self.pools.values())
            now = time.monotonic()
            due = [d for d in (pool.reap(now) for pool in pools) if d is not None]
            with self.lock:
                self._due = min(due) if due else None
            self._wake.wait(max(min(due) - now, 0.0) if due else None)


_pools: _Pools | None = None
_pools_lock = threading.Lock()


def _forget_parent_pools() -> None:
    """In a forked child: the parent's pools, locks and reaper are not the child's."""
    global _pools, _pools_lock
    _pools = None
    _pools_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_parent_pools)


def _current() -> _Pools:
    global _pools
    with _pools_lock:
        if _pools is None or _pools.pid != os.getpid():
            _pools = _Pools()
        return _pools


def pool_for(key: Hashable, make: Callable[[], ConnectionPool]) -> ConnectionPool:
    """This process's pool for ``key`` (made by ``make`` if there is none), one more user attached."""
    pools = _current()
    with pools.lock:
        pool = pools.pools.get(key)
        if pool is None:
            pool = pools.pools[key] = make()
            pool.on_idle = pools.wake
        pool.users += 1
        return pool


def detach(key: Hashable, pool: ConnectionPool) -> None:
    """One user of ``pool`` is done; the last one closes it (in the process that made it)."""
    pools = _current()
    with pools.lock:
        pool.users -= 1
        if pool.users > 0:
            return
        if pools.pools.get(key) is pool:
            del pools.pools[key]
    pool.close()
