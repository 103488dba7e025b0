"""``SftpTransport``: a worker's inputs and outputs, moved over SFTP and verified by SHA-256.

Downloads are hashed while they stream into a ``.partial`` file beside the
destination, resumed from the last byte written (and hashed) after a cut
connection, and renamed to the destination only once size and SHA-256 match
the reference; a mismatch starts the file over. Uploads go to a temporary name
beside the target, are verified by the server (size, and SHA-256 through the
``check-file`` extension of the embedded server; a server without it, such as
OpenSSH's, has the copy read back and hashed), and are then renamed into place
with ``posix-rename``, so a reader never sees a partial output.

paramiko moves one request at a time unless told otherwise; here reads and
writes of ``BLOCK`` bytes are kept ``DEPTH`` deep in flight on a wide SSH
window, through paramiko's request layer (``SFTPClient._async_request`` and
``_read_response``), which its own prefetching uses.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import random
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import paramiko
from paramiko.sftp import (
    CMD_ATTRS,
    CMD_CLOSE,
    CMD_EXTENDED,
    CMD_FSTAT,
    CMD_HANDLE,
    CMD_OPEN,
    CMD_READ,
    CMD_STATUS,
    CMD_WRITE,
    SFTP_EOF,
    SFTP_NO_SUCH_FILE,
    SFTP_OK,
    SFTP_OP_UNSUPPORTED,
    SFTP_PERMISSION_DENIED,
)
from paramiko.sftp_client import int64

from pipeline.config import Settings
from pipeline.errors import (
    AccessRefused,
    BadInput,
    ChecksumMismatch,
    PipelineError,
    TaskEnded,
    TransferError,
)
from pipeline.identity import worker_id
from pipeline.logs import get_logger
from pipeline.security.grants import ENDED
from pipeline.transfer.checksums import FileRef
from pipeline.transfer.sftp_pool import Connection, ConnectionPool, Lease, detach, pool_for
from pipeline.transfer.sftp_server import GRANT_EXTENSION, GRANT_RELEASE_EXTENSION

logger = get_logger(__name__)
#: paramiko's own log of our connections: quiet, since each failure is logged here with its task and
#: worker (paramiko would log a traceback for every handshake a crowded server closes).
PARAMIKO_LOG = f"{__name__}.ssh"
logging.getLogger(PARAMIKO_LOG).setLevel(logging.CRITICAL)

#: Bytes per read or write request: 255 KiB, the most OpenSSH's sftp-server
#: reads or writes at once (it shortens larger reads). Large requests cut
#: paramiko's per-message work, which is what limits it.
BLOCK = 255 * 1024
#: Requests kept in flight: 2 MiB, enough for a gigabit link with 16 ms round
#: trips. Deeper is slower: paramiko's channel buffer costs time in proportion
#: to what it holds, and replies pile up there faster than they are read.
DEPTH = 8
#: SSH channel window (above the data in flight, so the sender never waits for
#: window updates).
WINDOW_SIZE = 8 * 1024 * 1024
#: The largest SSH packet this side accepts (what a server sends file data
#: in). paramiko receives a packet in pieces it joins, at a cost that grows
#: faster than the packet; 64 KiB packets made downloads from the embedded
#: server nearly twice as fast as 256 KiB ones (bench/sftp_tuning.py).
MAX_PACKET_SIZE = 64 * 1024
#: Ciphers preferred, fastest first in paramiko; the server picks from its own list.
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
#: Local file reads while hashing.
HASH_BLOCK = 1024 * 1024
#: SFTP open flags.
READ, WRITE, CREATE, TRUNCATE = 0x01, 0x02, 0x08, 0x10

T = TypeVar("T")


#: Transfer grants held at most: those of tasks authorized and not yet
#: forgotten (a worker thread holds one, its current task's).
MAX_GRANTS = 16


def token_worker(token: str) -> str:
    """The worker name a token was issued to (read, not verified: the server verifies)."""
    import jwt

    try:
        return str(jwt.decode(token, options={"verify_signature": False})["sub"])
    except (jwt.InvalidTokenError, KeyError):
        raise TransferError("MORAG_WORKER_TOKEN is not a worker token") from None


class HostKeyRefused(TransferError):
    """The SFTP server's host key is unknown or differs from the pinned one; nothing was sent."""


class _Missing(Exception):
    """The remote file does not exist."""


class _Denied(Exception):
    """The server refused the request."""


class _Unsupported(Exception):
    """The server does not implement a request."""


class _SizeChanged(Exception):
    """The remote file's size differs from the reference."""


class _Failed(OSError):
    """The server answered a request with a failure (it may succeed when asked again)."""


#: Errors after which the connection is dropped and the transfer resumed on a new one.
TRANSIENT: tuple[type[BaseException], ...] = (OSError, EOFError, paramiko.SSHException, _Unsupported)


class HostKeyCheck:
    """The host key a worker accepts from the SFTP server, never learned on the fly.

    Parameters:
      pin: the server's key as its ``SHA256:...`` fingerprint or its public key
        line (``ssh-ed25519 AAAA...``), or None.
      known_hosts: an OpenSSH ``known_hosts`` file to look the server up in, or None.
    """

    def __init__(self, pin: str | None = None, known_hosts: Path | None = None) -> None:
        self.pin = pin.strip() if pin else None
        self.known_hosts = known_hosts

    @classmethod
    def from_settings(cls, settings: Settings) -> HostKeyCheck:
        return cls(settings.sftp_host_key, settings.sftp_known_hosts)

    def verify(self, host: str, port: int, key: paramiko.PKey) -> None:
        """Return if ``key`` is the expected one for ``host:port``; raise HostKeyRefused otherwise."""
        where = f"{host}:{port}"
        if self.pin:
            if self.pin.startswith("SHA256:"):
                if key.fingerprint == self.pin:
                    return
            else:
                fields = self.pin.split()
                if len(fields) >= 2 and fields[0] == key.get_name() and fields[1] == key.get_base64():
                    return
            raise HostKeyRefused(
                f"SFTP server {where} presented host key {key.fingerprint}, not the pinned "
                f"MORAG_SFTP_HOST_KEY: refusing to connect (if the server's key changed on purpose, "
                f"pin the new one)"
            )
        if self.known_hosts:
            try:
                known = paramiko.HostKeys(str(self.known_hosts))
            except OSError as exc:
                raise HostKeyRefused(f"cannot read known hosts {self.known_hosts}: {exc.strerror}") from None
            name = host if port == 22 else f"[{host}]:{port}"
            entry = known.lookup(name)
            if entry is None:
                raise HostKeyRefused(
                    f"SFTP server {where} is not in {self.known_hosts} (its key is {key.fingerprint}): "
                    f"refusing to connect to an unknown host"
                )
            if entry.get(key.get_name()) == key:
                return
            raise HostKeyRefused(
                f"SFTP server {where} presented host key {key.fingerprint}, which does not match "
                f"{self.known_hosts}: refusing to connect (the key changed)"
            )
        raise HostKeyRefused(
            f"no host key pinned for SFTP server {where} (it presented {key.fingerprint}): set "
            f"MORAG_SFTP_HOST_KEY to the fingerprint the server prints at start, or MORAG_SFTP_KNOWN_HOSTS"
        )


class SftpSession:
    """One SFTP channel on an authenticated SSH connection, with many requests in flight at once.

    Parameters:
      transport: the SSH connection.
      sftp: the SFTP client on one of its channels.
      owns_transport: whether closing the session closes the connection too
        (false for a channel of a pooled connection).
    """

    def __init__(
        self, transport: paramiko.Transport, sftp: paramiko.SFTPClient, owns_transport: bool = True
    ) -> None:
        self.transport = transport
        self.sftp = sftp
        self.owns_transport = owns_transport
        self._replies: dict[int, tuple[int, paramiko.Message]] = {}
        #: Whether the server takes transfer grants (OpenSSH's does not: it confines by chroot).
        self.takes_grants = True
        #: Folders this channel saw or made: the outputs of a task share one, asked about once.
        self._folders: set[str] = set()

    @property
    def active(self) -> bool:
        channel = self.sftp.get_channel()
        return self.transport.is_active() and channel is not None and not channel.closed

    def close(self) -> None:
        try:
            self.sftp.close()
        finally:
            if self.owns_transport:
                self.transport.close()

    # paramiko hands replies to requests sent with an object to that object's
    # ``_async_response``; this session collects them until asked for.
    def _async_response(self, t: int, msg: paramiko.Message, num: int) -> None:
        self._replies[num] = (t, msg)

    def send(self, t: int, *args: Any) -> int:
        """Send a request without waiting; its number identifies the reply."""
        return self.sftp._async_request(self, t, *args)

    def reply(self, num: int) -> tuple[int, paramiko.Message]:
        """Wait for the reply to request ``num``; raise for an error status."""
        while num not in self._replies:
            self.sftp._read_response()
        t, msg = self._replies.pop(num)
        if t == CMD_STATUS:
            _raise_status(msg)
        return t, msg

    def open(self, path: str, flags: int) -> bytes:
        """Open a remote file with SFTP open flags (``READ``, ``WRITE``, ...); returns its handle."""
        t, msg = self.reply(self.send(CMD_OPEN, path, flags, paramiko.SFTPAttributes()))
        if t != CMD_HANDLE:
            raise paramiko.SSHException(f"SFTP server answered open with message type {t}")
        return msg.get_binary()

    def close_handle(self, handle: bytes) -> None:
        self.reply(self.send(CMD_CLOSE, handle))

    @contextmanager
    def opened(self, path: str, flags: int) -> Iterator[bytes]:
        """A remote file's handle, closed on leaving (quietly if the block failed)."""
        handle = self.open(path, flags)
        try:
            yield handle
        except BaseException:
            if self.active:
                with suppress(Exception):
                    self.close_handle(handle)
            raise
        self.close_handle(handle)

    def size(self, path: str) -> int | None:
        """The remote file's size, None if it does not exist."""
        try:
            return int(self.sftp.stat(path).st_size or 0)
        except FileNotFoundError:
            return None
        except PermissionError:
            raise _Denied(path) from None

    def read(self, handle: bytes, offset: int, end: int) -> Iterator[bytes]:
        """The bytes from ``offset`` to ``end``, in order, ``DEPTH`` requests of ``BLOCK`` in flight.

        The next request goes out before a block is handed on, so the server
        stays busy while the caller writes and hashes it. When the connection
        breaks, replies already received are still handed on (so a resumed
        transfer starts after them) before the error is raised.
        """
        pending: deque[tuple[int, int, int]] = deque()
        ask = offset
        broken: BaseException | None = None

        def request(at: int, size: int, first: bool = False) -> None:
            nonlocal broken
            if broken is not None:
                return
            try:
                num = self.send(CMD_READ, handle, int64(at), size)
            except TRANSIENT as exc:
                broken = exc
                return
            if first:
                pending.appendleft((num, at, size))
            else:
                pending.append((num, at, size))

        def top_up() -> None:
            nonlocal ask
            while broken is None and ask < end and len(pending) < DEPTH:
                size = min(BLOCK, end - ask)
                request(ask, size)
                ask += size

        top_up()
        while offset < end:
            if not pending:
                raise broken or _SizeChanged(f"no reply after {offset} bytes")
            num, at, size = pending.popleft()
            try:
                _, msg = self.reply(num)
            except EOFError:
                raise _SizeChanged(f"file ends at {at} bytes") from None
            data = msg.get_string()
            if len(data) < size:
                request(at + len(data), size - len(data), first=True)  # a short read: the rest comes next
            top_up()
            offset += len(data)
            yield data

    def write(self, handle: bytes, offset: int, chunks: Iterator[bytes]) -> int:
        """Write ``chunks`` from ``offset``, ``DEPTH`` requests in flight; returns the end offset."""
        pending: deque[int] = deque()
        for chunk in chunks:
            pending.append(self.send(CMD_WRITE, handle, int64(offset), chunk))
            offset += len(chunk)
            while len(pending) >= DEPTH:
                self.reply(pending.popleft())
        while pending:
            self.reply(pending.popleft())
        return offset

    def sha256(self, handle: bytes, offset: int = 0, length: int = 0) -> str:
        """SHA-256 of a range of the remote file, computed by the server (``check-file``)."""
        return self.sha256_reply(self.send_sha256(handle, offset, length))

    def send_sha256(self, handle: bytes, offset: int = 0, length: int = 0) -> int:
        """Ask for ``sha256`` without waiting; ``sha256_reply`` reads the answer."""
        return self.send(CMD_EXTENDED, "check-file", handle, "sha256", int64(offset), int64(length), 0)

    def sha256_reply(self, num: int) -> str:
        """The hash asked for by request ``num``; ``_Unsupported`` when the server cannot hash."""
        _, msg = self.reply(num)
        msg.get_text()
        if msg.get_text() != "sha256":
            raise _Unsupported("check-file answered with another hash")
        return msg.get_remainder().hex()

    def present_grant(self, grant: str) -> None:
        """Hand the server a task's transfer grant (``grant@morag-pipeline``).

        Raises ``_Denied`` with the server's reason when it refuses the grant,
        ``OSError`` when it cannot decide now. A server without grants
        (OpenSSH) is remembered as such and sent none again.
        """
        if not self.takes_grants:
            return
        try:
            self.reply(self.send(CMD_EXTENDED, GRANT_EXTENSION, grant))
        except _Unsupported:
            self.takes_grants = False

    def release_grant(self, task_id: str) -> None:
        """Tell the server this worker is done with a task (``grant-release@morag-pipeline``)."""
        if not self.takes_grants:
            return
        try:
            self.reply(self.send(CMD_EXTENDED, GRANT_RELEASE_EXTENSION, task_id))
        except _Unsupported:
            self.takes_grants = False

    def fstat_size(self, num: int) -> int:
        """The size in the answer to an ``FSTAT`` request ``num`` (``send(CMD_FSTAT, handle)``)."""
        t, msg = self.reply(num)
        if t != CMD_ATTRS:
            raise paramiko.SSHException(f"SFTP server answered fstat with message type {t}")
        return int(paramiko.SFTPAttributes._from_msg(msg).st_size or 0)

    def mkdirs(self, folder: str) -> None:
        """Create ``folder`` and its parents where missing (asked of the server once per channel:
        a folder removed since makes the next open fail, and the retry takes a new channel)."""
        if folder in ("", "/", ".") or folder in self._folders:
            return
        if self.size(folder) is None:
            self.mkdirs(posixpath.dirname(folder))
            try:
                self.sftp.mkdir(folder)
            except OSError:
                if self.size(folder) is None:
                    raise
        self._folders.add(folder)


def _raise_status(msg: paramiko.Message) -> None:
    code = msg.get_int()
    text = msg.get_text()
    if code == SFTP_OK:
        return
    if code == SFTP_EOF:
        raise EOFError(text)
    if code == SFTP_NO_SUCH_FILE:
        raise _Missing(text)
    if code == SFTP_PERMISSION_DENIED:
        raise _Denied(text)
    if code == SFTP_OP_UNSUPPORTED:
        raise _Unsupported(text)
    raise _Failed(f"SFTP server: {text or 'failure'}")


#: Per process: the index in MORAG_SFTP_HOST of the server that took the last login, tried first.
_answering: dict[str, int] = {}


def open_connection(settings: Settings, check: HostKeyCheck | None = None) -> paramiko.Transport:
    """An SSH connection to a server the settings name, its host key verified, logged in.

    ``MORAG_SFTP_HOST`` may name several servers (replicas serving one
    store): the one that took the last login is tried first, and one that
    cannot be reached or closes the connection before the login completes
    makes way for the next. A refused login or host key is not passed over:
    it raises at once. When none answers, the last server's error is raised,
    a transient one (``EOFError``, ``OSError`` or ``paramiko.SSHException``):
    the transfer tries again after its backoff.
    """
    addresses = settings.sftp_addresses
    first = _answering.get(settings.sftp_host, 0) % len(addresses)
    for turn in range(len(addresses)):
        index = (first + turn) % len(addresses)
        host, port = addresses[index]
        try:
            transport = _open_one(settings, host, port, check)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            if turn == len(addresses) - 1:
                raise
            following = "{}:{}".format(*addresses[(index + 1) % len(addresses)])
            logger.warning(
                "sftp server not answering; trying the next one",
                extra={"server": f"{host}:{port}", "next": following, "error": _describe(exc)},
            )
            continue
        _answering[settings.sftp_host] = index
        return transport
    raise AssertionError("unreachable")  # the loop returns or raises


def _open_one(settings: Settings, host: str, port: int, check: HostKeyCheck | None) -> paramiko.Transport:
    sock = socket.create_connection((host, port), timeout=settings.sftp_timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    transport = paramiko.Transport(
        sock, default_window_size=WINDOW_SIZE, default_max_packet_size=MAX_PACKET_SIZE
    )
    transport.set_log_channel(PARAMIKO_LOG)
    try:
        options = transport.get_security_options()
        options.ciphers = tuple(c for c in CIPHERS if c in options.ciphers) + tuple(
            c for c in options.ciphers if c not in CIPHERS
        )
        transport.banner_timeout = transport.handshake_timeout = settings.sftp_timeout_s
        transport.auth_timeout = transport.channel_timeout = settings.sftp_timeout_s
        transport.start_client(timeout=settings.sftp_timeout_s)
        (check or HostKeyCheck.from_settings(settings)).verify(host, port, transport.get_remote_server_key())
        _authenticate(transport, settings, f"{host}:{port}")
        transport.set_keepalive(30)
    except BaseException:
        transport.close()
        raise
    return transport


def open_channel(transport: paramiko.Transport, timeout: float, owns_transport: bool = False) -> SftpSession:
    """A new SFTP channel on a logged-in connection."""
    channel = transport.open_session(
        window_size=WINDOW_SIZE, max_packet_size=MAX_PACKET_SIZE, timeout=timeout
    )
    try:
        channel.settimeout(timeout)
        channel.invoke_subsystem("sftp")
        sftp = paramiko.SFTPClient(channel)
    except BaseException:
        channel.close()
        raise
    return SftpSession(transport, sftp, owns_transport)


def connect(settings: Settings, check: HostKeyCheck | None = None) -> SftpSession:
    """An SFTP session on a connection of its own to the server the settings name (closed with it)."""
    transport = open_connection(settings, check)
    try:
        return open_channel(transport, settings.sftp_timeout_s, owns_transport=True)
    except BaseException:
        transport.close()
        raise


def _authenticate(transport: paramiko.Transport, settings: Settings, where: str) -> None:
    """An enrolled worker logs in with its token; otherwise with the shared account's key or password."""
    user = settings.sftp_username
    try:
        if settings.worker_token is not None:
            token = settings.worker_token.get_secret_value()
            user = token_worker(token)
            transport.auth_password(user, token)
        elif settings.sftp_key_file is not None:
            transport.auth_publickey(user, paramiko.PKey.from_path(settings.sftp_key_file))
        elif settings.sftp_password is not None:
            transport.auth_password(user, settings.sftp_password.get_secret_value())
        else:
            raise TransferError("no SFTP credentials: set MORAG_SFTP_PASSWORD or MORAG_SFTP_KEY_FILE")
    except paramiko.AuthenticationException as exc:
        # Refused only when the server answered; closed or unanswered, it is busy or restarting.
        if not transport.is_active():
            raise EOFError("the SFTP server closed the connection during login") from None
        answered = getattr(transport.auth_handler, "auth_event", None)
        if answered is not None and not answered.is_set():
            raise TimeoutError(
                f"the SFTP server did not answer the login in {settings.sftp_timeout_s:g} s"
            ) from None
        raise TransferError(f"SFTP server {where} refused worker {user!r}: {exc}") from None
    except OSError as exc:
        if settings.sftp_key_file is not None and not settings.sftp_key_file.is_file():
            raise TransferError(f"cannot read MORAG_SFTP_KEY_FILE {settings.sftp_key_file}") from None
        raise exc


def _task_of(store_path: str) -> str | None:
    parts = store_path.split("/")
    return parts[1] if len(parts) > 2 and parts[0] == "tasks" else None


def _checked_store_path(store_path: str) -> str:
    parts = store_path.split("/")
    if not store_path or store_path.startswith("/") or "\x00" in store_path or ".." in parts:
        raise BadInput(f"invalid store path {store_path!r}")
    return store_path


class _Download:
    """A download in progress: the ``.partial`` file and the SHA-256 of what it holds."""

    def __init__(self, partial: Path) -> None:
        self.partial = partial
        self.file = partial.open("wb")
        self.digest = hashlib.sha256()
        self.offset = 0

    def add(self, data: bytes) -> None:
        try:
            self.file.write(data)
        except OSError as exc:
            raise TransferError(f"cannot write {self.partial}: {exc.strerror}") from None
        self.digest.update(data)
        self.offset += len(data)

    def restart(self) -> None:
        self.file.seek(0)
        self.file.truncate()
        self.digest = hashlib.sha256()
        self.offset = 0

    def close(self) -> None:
        self.file.close()


def _local_chunks(path: Path, offset: int, digest: Any) -> Iterator[bytes]:
    with path.open("rb") as f:
        f.seek(offset)
        while chunk := f.read(BLOCK):
            digest.update(chunk)
            yield chunk


def _hash_prefix(path: Path, length: int) -> Any:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while length > 0 and (chunk := f.read(min(HASH_BLOCK, length))):
            digest.update(chunk)
            length -= len(chunk)
    return digest


class SftpTransport:
    """The ``Transport`` of workers that share no disk with the server: files over SFTP.

    One per thread (not thread-safe). The threads of a process share the SSH
    connections of one ``ConnectionPool`` per server and credentials: at most
    ``sftp_pool_connections``, closed after ``sftp_pool_idle_s`` with no
    transfer. Each public call borrows an SFTP channel on the least-loaded of
    them and gives it back when it returns; a transfer cut short takes a new
    channel (on a new connection if its own died) and resumes. The grants of
    this thread's tasks are presented on whichever connection its channel
    rides, again after a reconnect.

    Parameters:
      settings: server address, root, credentials, host key pin, attempts, backoff and pool size.
      check: the host key check (default: from the settings).
      sleep: how to wait between attempts.
    """

    def __init__(
        self,
        settings: Settings,
        check: HostKeyCheck | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.check = check or HostKeyCheck.from_settings(settings)
        self.root = settings.sftp_root
        self.sleep = sleep
        self._grants: dict[str, str] = {}  # task id -> grant, of the tasks held, oldest first
        self._current: str | None = None  # the task authorized last and not yet forgotten
        self.worker = settings.worker_name or worker_id()
        self._pool: ConnectionPool[SftpSession] | None = None  # attached on first use
        self._pid = os.getpid()
        self._lease: Lease[SftpSession] | None = None  # the channel of the call under way
        self._home: Connection[SftpSession] | None = None  # where the last channel was, preferred next

    @classmethod
    def from_settings(cls, settings: Settings) -> SftpTransport:
        return cls(settings)

    # Connection.
    def _leave_parent(self) -> None:
        """In a forked child, forget the parent's pool, channel and connection, untouched."""
        if self._pid != os.getpid():
            self._pid, self._pool, self._lease, self._home = os.getpid(), None, None, None

    @property
    def pool(self) -> ConnectionPool[SftpSession]:
        """This process's pool of connections to the server, with these credentials."""
        self._leave_parent()
        if self._pool is None:
            settings, check = self.settings, self.check
            self._pool = pool_for(
                _pool_key(settings, check),
                lambda: ConnectionPool(
                    settings.sftp_pool_connections,
                    settings.sftp_pool_idle_s,
                    lambda: open_connection(settings, check),
                    lambda transport: open_channel(transport, settings.sftp_timeout_s),
                    _login_name(settings),
                ),
            )
        return self._pool

    def session(self) -> SftpSession:
        """This thread's SFTP channel, borrowed from the pool, with every grant it holds presented
        on the channel's connection; kept until the current call returns."""
        lease = self._lease
        if lease is not None and lease.active:
            return lease.channel
        self.drop()
        lease = self._lease = self.pool.lease(prefer=self._home)
        assert lease is not None
        self._home = lease.connection
        self._present_held(lease)  # a new connection knows none of them
        return lease.channel

    @contextmanager
    def _call(self) -> Iterator[None]:
        """A public call's use of the channel: given back for reuse if the call succeeds,
        closed if it fails (replies to requests in flight may still come on it)."""
        try:
            yield
        except BaseException:
            self.drop()
            raise
        lease, self._lease = self._lease, None
        if lease is not None:
            self.pool.give_back(lease, reuse=True)

    # Transfer grants.
    def authorize(self, task_id: str, grant: str) -> None:
        """Present the grant of the task about to run; held, and presented again after a reconnect.

        Raises ``AccessRefused`` with the server's reason when the server will
        never honour it (its task ended elsewhere, or the grant is forged or
        expired for a task the server does not know). It is presented at once
        when a connection is open, otherwise on the connection of the next
        transfer. When the server cannot decide now the channel is dropped,
        and the next transfer presents the grant again, with its retries.
        """
        self._grants.pop(task_id, None)
        self._grants[task_id] = grant
        self._current = task_id
        while len(self._grants) > MAX_GRANTS:
            oldest = next(t for t in self._grants if t != task_id)
            self._grants.pop(oldest)
            self._let_go(oldest)
        with self._call():
            lease = self._lease
            if lease is None or not lease.active:
                self.drop()
                lease = self._lease = self.pool.lease(prefer=self._home, connect=False)
                if lease is None:
                    return  # nothing open: presented as the next transfer connects
                self._home = lease.connection
            try:
                self._present_on(lease, task_id, grant)
            except TRANSIENT as exc:
                logger.warning(
                    "sftp grant not taken yet, presenting it again on the next transfer",
                    extra={"task_id": task_id, "worker": self.worker, "error": _describe(exc)},
                )
                self._failed(exc)

    def forget(self, task_id: str) -> None:
        """The task ended on this worker: its grant is never presented again, and the server drops
        it from each connection where no other thread of this process still holds it."""
        if self._grants.pop(task_id, None) is None:
            return
        if self._current == task_id:
            self._current = None
        with self._call():
            for connection in self.pool.connections():
                self._release_on(connection, task_id)

    def _present_held(self, lease: Lease[SftpSession]) -> None:
        """Present every grant held: the current task's must be taken; a refused older one is forgotten."""
        for task_id, grant in list(self._grants.items()):
            if task_id == self._current:
                continue
            try:
                self._present_on(lease, task_id, grant)
            except (_Failed, AccessRefused, TaskEnded) as exc:
                self._grants.pop(task_id, None)
                logger.warning(
                    "sftp server refused an old transfer grant: forgotten",
                    extra={"task_id": task_id, "worker": self.worker, "reason": str(exc)},
                )
        if self._current is not None:
            self._present_on(lease, self._current, self._grants[self._current])

    def _present_on(self, lease: Lease[SftpSession], task_id: str, grant: str) -> None:
        """Present a grant on the lease's connection, unless it was presented there already."""
        connection = lease.connection
        with connection.grant_lock:
            holders = connection.grants.get(task_id)
            if holders is None:
                self._present(lease.channel, task_id, grant)
                holders = connection.grants[task_id] = set()
            holders.add(self)

    def _present(self, session: SftpSession, task_id: str, grant: str) -> None:
        try:
            session.present_grant(grant)
        except _Denied as exc:
            self._grants.pop(task_id, None)
            if self._current == task_id:
                self._current = None
            if ENDED in str(exc):
                raise TaskEnded(f"the server says: {exc}") from None
            raise AccessRefused(f"the SFTP server refused the grant of task {task_id}: {exc}") from None

    def _release_on(self, connection: Connection[SftpSession], task_id: str) -> None:
        """Let go of a task's grant on one connection; released there once no thread holds it."""
        with connection.grant_lock:
            holders = connection.grants.get(task_id)
            if holders is None or self not in holders:
                return
            holders.discard(self)
            if holders:
                return  # another thread of this process runs the same task on this connection
            del connection.grants[task_id]
            try:
                lease = self.pool.lease_on(connection)
                if lease is None:
                    return  # closed meanwhile: the server dropped its grants with it
                try:
                    lease.channel.release_grant(task_id)
                except BaseException:
                    self.pool.give_back(lease, reuse=False)
                    raise
                self.pool.give_back(lease, reuse=True)
            except (_Denied, _Unsupported, *TRANSIENT):
                self.pool.discard(connection)  # closing it drops the grant on the server

    def _let_go(self, task_id: str) -> None:
        """Stop holding a task's grant without releasing it (left to the connections' end)."""
        for connection in self.pool.connections():
            with connection.grant_lock:
                connection.grants.get(task_id, set()).discard(self)

    def drop(self) -> None:
        """Close this thread's channel (the next call borrows another); its connection goes too
        if it died."""
        self._leave_parent()
        lease, self._lease = self._lease, None
        if lease is not None and self._pool is not None:
            self._pool.give_back(lease, reuse=False)

    def _failed(self, exc: BaseException) -> None:
        """A request failed with ``exc``: drop the channel, and its connection after a timeout
        (a connection that stops answering may be gone without a word)."""
        lease = self._lease
        self.drop()
        if lease is not None and isinstance(exc, TimeoutError):
            self.pool.discard(lease.connection)

    def close(self) -> None:
        """This thread is done: its grants are let go and its pool detached (closed with its
        last thread). A later call attaches again."""
        self.drop()
        pool = self._pool
        if pool is not None:
            if pool.users > 1:  # other threads still use the connections: release this thread's grants
                for task_id in list(self._grants):
                    with suppress(PipelineError, *TRANSIENT):
                        self.forget(task_id)
            detach(_pool_key(self.settings, self.check), pool)
        self._pool = self._home = None
        self._grants.clear()
        self._current = None

    def remote(self, store_path: str) -> str:
        return posixpath.join(self.root, _checked_store_path(store_path))

    def _backoff(self, failures: int) -> None:
        delay = min(self.settings.sftp_backoff_s * 2 ** (failures - 1), self.settings.sftp_max_backoff_s)
        self.sleep(delay * random.uniform(0.5, 1.0))

    def _log(self, store_path: str, **fields: Any) -> dict[str, Any]:
        return {"task_id": _task_of(store_path), "worker": self.worker, "path": store_path, **fields}

    # Downloads.
    def download(self, ref: FileRef, dest: Path) -> Path:
        """Fetch ``ref`` to ``dest``; ``dest`` appears only once its size and SHA-256 match."""
        with self._call():
            return self._download(ref, dest)

    def _download(self, ref: FileRef, dest: Path) -> Path:
        path = self.remote(ref.path)
        partial = dest.with_name(dest.name + ".partial")
        state = _Download(partial)
        attempts = self.settings.sftp_attempts
        failures = mismatches = 0
        try:
            while True:
                started_at = state.offset
                try:
                    self._fetch(path, ref, state)
                except _Missing:
                    raise BadInput(f"{ref.path}: not in the store") from None
                except _Denied:
                    raise TransferError(f"{ref.path}: the SFTP server refused to read it") from None
                except _SizeChanged as exc:
                    self.drop()  # replies to the reads still in flight are of no use
                    mismatch = f"size differs ({exc})"
                except TRANSIENT as exc:
                    self._failed(exc)
                    failures = 0 if state.offset > started_at else failures + 1
                    if failures >= attempts:
                        raise TransferError(
                            f"{ref.path}: download failed after {attempts} attempts: {_describe(exc)}"
                        ) from None
                    logger.warning(
                        "sftp download interrupted, resuming",
                        extra=self._log(ref.path, offset=state.offset, error=_describe(exc)),
                    )
                    self._backoff(max(failures, 1))
                    continue
                else:
                    sha256 = state.digest.hexdigest()
                    if state.offset == ref.size and sha256 == ref.sha256:
                        state.close()
                        os.replace(partial, dest)
                        return dest
                    mismatch = f"got {state.offset} bytes sha256 {sha256[:12]}…"
                mismatches += 1
                logger.warning(
                    "sftp download does not match its checksum, fetching again",
                    extra=self._log(ref.path, attempt=mismatches, detail=mismatch),
                )
                if mismatches >= attempts:
                    raise ChecksumMismatch(
                        f"{ref.path}: expected {ref.size} bytes sha256 {ref.sha256[:12]}…, {mismatch} "
                        f"(after {attempts} attempts)"
                    )
                state.restart()
                self._backoff(mismatches)
        finally:
            state.close()
            partial.unlink(missing_ok=True)

    def _fetch(self, path: str, ref: FileRef, state: _Download) -> None:
        session = self.session()
        with session.opened(path, READ) as handle:
            size = session.size(path)
            if size != ref.size:
                raise _SizeChanged(f"the server's copy has {size} bytes")
            for data in session.read(handle, state.offset, ref.size):
                state.add(data)

    def read_small(self, store_path: str, limit: int = 1 << 20) -> bytes | None:
        """The first ``limit`` bytes of a store file, or None if it does not exist (not checksummed)."""
        with self._call():
            return self._read_small(store_path, limit)

    def _read_small(self, store_path: str, limit: int) -> bytes | None:
        path = self.remote(store_path)
        failures = 0
        while True:
            try:
                session = self.session()
                size = session.size(path)
                if size is None:
                    return None
                with session.opened(path, READ) as handle:
                    return b"".join(session.read(handle, 0, min(size, limit)))
            except _Missing:
                return None
            except _Denied:
                raise TransferError(f"{store_path}: the SFTP server refused to read it") from None
            except (_SizeChanged, *TRANSIENT) as exc:
                self._failed(exc)
                failures += 1
                if failures >= self.settings.sftp_attempts:
                    raise TransferError(
                        f"{store_path}: read failed after {failures} attempts: {_describe(exc)}"
                    ) from None
                self._backoff(failures)

    # Uploads.
    def upload(self, src: Path, store_path: str) -> FileRef:
        """Put ``src`` at ``store_path`` under a temporary name, have it verified, rename it into place."""
        with self._call():
            return self._upload(src, store_path)

    def _upload(self, src: Path, store_path: str) -> FileRef:
        final = self.remote(store_path)
        temp = posixpath.join(
            posixpath.dirname(final), f".{posixpath.basename(final)}.{uuid.uuid4().hex[:12]}.partial"
        )
        size = src.stat().st_size
        attempts = self.settings.sftp_attempts
        failures = mismatches = 0
        resume = False
        try:
            while True:
                try:
                    sha256, held, held_size = self._put(src, temp, resume)
                    self._verify(temp, size, sha256, held, held_size, store_path)
                    self.session().sftp.posix_rename(temp, final)
                    return FileRef(store_path, sha256, size)
                except _Denied:
                    raise TransferError(f"{store_path}: the SFTP server refused to write it") from None
                except ChecksumMismatch as exc:
                    mismatches += 1
                    if mismatches >= attempts:
                        raise ChecksumMismatch(f"{exc} (after {attempts} attempts)") from None
                    logger.warning("sftp upload did not verify, sending again", extra=self._log(store_path))
                    resume = False
                    self._backoff(mismatches)
                except (_Missing, _SizeChanged, *TRANSIENT) as exc:  # the temporary file may have gone
                    self._failed(exc)
                    failures += 1
                    if failures >= attempts:
                        raise TransferError(
                            f"{store_path}: upload failed after {attempts} attempts: {_describe(exc)}"
                        ) from None
                    logger.warning(
                        "sftp upload interrupted, resuming", extra=self._log(store_path, error=_describe(exc))
                    )
                    resume = True
                    self._backoff(failures)
        except BaseException:
            self._remove_quietly(temp)
            raise

    def _put(self, src: Path, temp: str, resume: bool) -> tuple[str, str | None, int]:
        """Send ``src`` to ``temp``, from where a previous attempt stopped if ``resume``.

        Returns the SHA-256 of what was sent, the one the server computed of
        what it holds (None if it cannot hash) and the size it holds, both
        asked for at once on the open file (one round trip).
        """
        session = self.session()
        session.mkdirs(posixpath.dirname(temp))
        size = src.stat().st_size
        offset = min(session.size(temp) or 0, size) if resume else 0
        flags = READ | WRITE if offset else WRITE | CREATE | TRUNCATE
        with session.opened(temp, flags) as handle:
            digest = _hash_prefix(src, offset) if offset else hashlib.sha256()
            if offset and not self._same_prefix(session, handle, digest.hexdigest(), offset):
                offset, digest = 0, hashlib.sha256()
            if offset:
                logger.info("sftp upload resumed", extra=self._log(temp, offset=offset))
            session.write(handle, offset, _local_chunks(src, offset, digest))
            asked_size, asked_hash = session.send(CMD_FSTAT, handle), session.send_sha256(handle)
            held_size = session.fstat_size(asked_size)
            try:
                held = session.sha256_reply(asked_hash)
            except _Unsupported:
                held = None
        return digest.hexdigest(), held, held_size

    def _same_prefix(self, session: SftpSession, handle: bytes, sha256: str, length: int) -> bool:
        """Whether the server's first ``length`` bytes hash to ``sha256``; True if it cannot say."""
        try:
            return session.sha256(handle, 0, length) == sha256
        except _Unsupported:
            return True  # the final verification catches a bad prefix

    def _verify(
        self, temp: str, size: int, sha256: str, held: str | None, held_size: int, store_path: str
    ) -> None:
        """Compare the server's copy with what was sent: its size as the server reported it
        (``held_size``), and its SHA-256 as the server computed it (``held``) or, if it cannot,
        as read back."""
        session = self.session()
        if held is None:
            digest = hashlib.sha256()
            with session.opened(temp, READ) as handle:
                for data in session.read(handle, 0, held_size or 0):
                    digest.update(data)
            held = digest.hexdigest()
        if held_size != size or held != sha256:
            raise ChecksumMismatch(
                f"{store_path}: sent {size} bytes sha256 {sha256[:12]}…, "
                f"the server holds {held_size} bytes sha256 {held[:12]}…"
            )

    def _remove_quietly(self, temp: str) -> None:
        if self._lease is None or not self._lease.active:
            return
        with suppress(Exception):
            self._lease.channel.sftp.remove(temp)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _pool_key(settings: Settings, check: HostKeyCheck) -> Hashable:
    """What makes two transports share a pool: the same server, credentials, host key check and pool."""

    def secret(value: Any) -> str | None:
        return value.get_secret_value() if value is not None else None

    return (
        settings.sftp_host,
        settings.sftp_port,
        settings.sftp_username,
        secret(settings.worker_token),
        secret(settings.sftp_password),
        settings.sftp_key_file,
        settings.sftp_timeout_s,
        settings.sftp_pool_connections,
        settings.sftp_pool_idle_s,
        type(check),
        check.pin,
        check.known_hosts,
    )


def _login_name(settings: Settings) -> str:
    """Who the pool's connections log in as (for logs); the token's worker for an enrolled worker."""
    if settings.worker_token is not None:
        with suppress(TransferError):
            return token_worker(settings.worker_token.get_secret_value())
    return settings.sftp_username
