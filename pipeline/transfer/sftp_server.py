"""The embedded SFTP server: the task store, served to workers over SSH.

``morag-pipeline server`` starts one (``start_sftp_server``) unless an OpenSSH
server serves the store instead. Clients see the store root as ``/``; no path
they send, whatever ``..``, absolute path or symlink it holds, reaches outside
it. Every request is also checked against the ``Grant`` of the authenticated
``Principal``: the shared worker account (served only when the settings turn
it on, ``sftp_shared_account``) reaches the whole store, an enrolled
worker (``TokenLogins``) only the tasks whose transfer grants it presented on
its session, for as long as those tasks are open (``pipeline.security.grants``),
and only grants of its own capability's queue (or of a task rerouted to it).
An enrolled worker's token is checked again on every grant and every open,
and a watcher closes the sessions of a revoked token within seconds
(``TOKEN_CHECK_S``, ``WATCH_INTERVAL_S``).

The server holds up against a crowded fleet and a hostile peer
(``SftpLimits``): it serves a bounded number of connections; an address may
hold only a few connections that have not logged in (a whole fleet behind one
address logs in freely); an address that keeps failing to log in is refused
for a while that doubles with each further failure (``LoginThrottle``); a
connection must log in within the handshake timeout, and a logged-in one that
sends no SFTP request for the idle timeout is closed.

Besides plain SFTP v3 the server answers four extensions: ``check-file`` with
the ``sha256`` algorithm (the client asks the server to hash what it holds, so
an upload is verified by the server, not by the client's word),
``posix-rename@openssh.com`` (an atomic rename that replaces the target),
``grant@morag-pipeline`` (present a task's transfer grant) and
``grant-release@morag-pipeline`` (the worker is done with a task: forget its
grant).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import logging
import os
import posixpath
import socket
import stat
import struct
import threading
import time
from base64 import b64decode
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paramiko.sftp import (
    CMD_DATA,
    CMD_EXTENDED,
    CMD_EXTENDED_REPLY,
    CMD_FSETSTAT,
    CMD_INIT,
    CMD_MKDIR,
    CMD_OPEN,
    CMD_READ,
    CMD_SETSTAT,
    CMD_VERSION,
    SFTP_BAD_MESSAGE,
    SFTP_EOF,
    SFTP_FAILURE,
    SFTP_OK,
    SFTP_OP_UNSUPPORTED,
    SFTP_PERMISSION_DENIED,
    SFTPError,
)

from pipeline.config import Settings
from pipeline.errors import PipelineError
from pipeline.logs import get_logger
from pipeline.security.audit import audit
from pipeline.security.grants import (
    GrantCheck,
    GrantRefused,
    SessionGrants,
    TaskRouteLookup,
    TaskStateLookup,
    TokenStanding,
)
from pipeline.security.tokens import AuthError, TokenStore
from pipeline.transfer.sftp_limits import LoginThrottle, LogLimiter, SftpLimits

logger = get_logger(__name__)
#: paramiko's own log of server connections. It reports every client that
#: hangs up without a goodbye (paramiko clients never send one) as an error;
#: the server logs connections, logins and refusals itself, so it stays quiet.
PARAMIKO_LOG = f"{__name__}.ssh"
logging.getLogger(PARAMIKO_LOG).setLevel(logging.CRITICAL)

#: The SFTP protocol version served (the one OpenSSH and paramiko speak).
SFTP_VERSION = 3
#: Largest read answered at once; clients ask for 32 KiB to 255 KiB.
MAX_READ = 1024 * 1024
#: Block used when hashing a file for ``check-file``.
HASH_BLOCK = 1024 * 1024
#: SSH channel window and largest packet the server accepts. A window well
#: above the data a client keeps in flight (2 MiB for ours) keeps uploads
#: streaming; a much larger one only lets paramiko's channel buffer grow.
WINDOW_SIZE = 8 * 1024 * 1024
MAX_PACKET_SIZE = 256 * 1024
#: Connections the kernel queues until the server accepts them: a fleet that
#: reconnects at once (a server restart) is queued, not dropped.
LISTEN_BACKLOG = 1024
#: Seconds a worker token found standing is trusted before its record is read again.
TOKEN_CHECK_S = 1.0
#: Seconds between two rounds of the watcher that closes the sessions of revoked
#: tokens, connections that did not log in in time, and idle ones.
WATCH_INTERVAL_S = 1.0

HOST_KEY_NAME = "sftp_host_ed25519_key"
#: The SFTP extension a worker presents a task's transfer grant with.
GRANT_EXTENSION = "grant@morag-pipeline"
#: The SFTP extension a worker forgets a task's grant with, by task id.
GRANT_RELEASE_EXTENSION = "grant-release@morag-pipeline"

#: The head of an SSH_FXP_DATA reply: packet length, type, request id, data length.
_DATA_HEADER = struct.Struct(">IBII")


class SftpServerError(PipelineError):
    """The SFTP server cannot start: bad host key, port in use, no credentials."""


class LoginRefused(Exception):
    """A login refused for a reason worth recording (a worker token's), rather than a bare no.

    Parameters:
      reason: why, for the log and the audit (never the credential itself).
      guess: whether the credential may be a guess (a bad signature). A token
        the server did sign, revoked or expired since, is no guess: its
        refusals do not count towards the address's failed logins, so one
        revoked box cannot lock out the fleet that shares its address.
    """

    def __init__(self, reason: str, *, guess: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.guess = guess


# Who may do what.


class Grant(Protocol):
    """What an authenticated client may touch, by store path (``tasks/<id>/...``, no leading slash)."""

    def allows(self, path: str, *, write: bool) -> bool: ...


class WholeStore:
    """A grant to read and write every path in the store."""

    def allows(self, path: str, *, write: bool) -> bool:
        return True


@dataclass(frozen=True)
class Principal:
    """An authenticated client: its name (for logs), what it may touch, and whether its
    credential still stands (None: nothing revokes it; else None while it stands, or why not)."""

    name: str
    grant: Grant = field(default_factory=WholeStore)
    standing: TokenStanding | None = None


class Authenticator(Protocol):
    """Decides who may log in, and with which grant: a ``Principal``, None (refused), or
    ``LoginRefused`` raised with the reason."""

    def methods(self, username: str) -> list[str]:
        """SSH authentication methods offered to ``username`` (``password``, ``publickey``)."""

    def check_password(self, username: str, password: str) -> Principal | None: ...

    def check_public_key(self, username: str, key: paramiko.PKey) -> Principal | None: ...


class WorkerCredentials:
    """Accepts one configured worker account with the whole store as its grant.

    Parameters:
      username: the account workers log in as.
      password: its password, or None to refuse password logins.
      authorized_keys: public keys that may log in as ``username``.
    """

    def __init__(
        self, username: str, password: str | None = None, authorized_keys: list[paramiko.PKey] | None = None
    ) -> None:
        self.username = username
        self.password = password
        self.authorized_keys = list(authorized_keys or [])

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerCredentials:
        password = settings.sftp_password.get_secret_value() if settings.sftp_password else None
        keys = read_authorized_keys(settings.sftp_authorized_keys) if settings.sftp_authorized_keys else []
        return cls(settings.sftp_username, password or None, keys)

    def methods(self, username: str) -> list[str]:
        found = []
        if self.password is not None:
            found.append("password")
        if self.authorized_keys:
            found.append("publickey")
        return found

    def _known(self, username: str) -> bool:
        return hmac.compare_digest(username.encode(), self.username.encode())

    def check_password(self, username: str, password: str) -> Principal | None:
        if self.password is None:
            return None
        good = hmac.compare_digest(password.encode(), self.password.encode())
        return Principal(username) if good and self._known(username) else None

    def check_public_key(self, username: str, key: paramiko.PKey) -> Principal | None:
        if self._known(username) and any(key == known for known in self.authorized_keys):
            return Principal(username)
        return None


class TokenStandings:
    """Whether worker tokens still stand, by token id, each record read at most every ``cache_s``.

    A token stands while the server knows it, has not revoked it and it has
    not expired. When the database cannot be read, the last answer holds (a
    token never read stands) until it can.

    Parameters:
      tokens: the server's worker tokens.
      cache_s: seconds an answer is reused.
    """

    def __init__(self, tokens: TokenStore, cache_s: float = TOKEN_CHECK_S) -> None:
        self.tokens = tokens
        self.cache_s = cache_s
        self._known: dict[str, tuple[float, str | None]] = {}
        self._lock = threading.Lock()

    def reason(self, token_id: str) -> str | None:
        """None while the token stands; why it does not otherwise."""
        now = time.monotonic()
        with self._lock:
            cached = self._known.get(token_id)
        if cached is not None and now - cached[0] < self.cache_s:
            return cached[1]
        try:
            self.tokens.check_id(token_id)
            found = None
        except AuthError as exc:
            found = str(exc)
        except Exception as exc:  # the database is busy: keep the last answer
            logger.warning("cannot read a worker token", extra={"token": token_id, "error": str(exc)})
            return cached[1] if cached is not None else None
        with self._lock:
            self._known[token_id] = (now, found)
        return found

    def standing(self, token_id: str) -> TokenStanding:
        """The check of one token, for a session that logged in with it."""
        return lambda: self.reason(token_id)


class TokenLogins:
    """Enrolled workers log in with their token as password and get only the grants they present.

    The username must be the token's worker name. The session starts with no
    access at all; each task's transfer grant, sent with the
    ``grant@morag-pipeline`` extension, opens that task's input for reading
    and its output folder for reading and writing, for as long as ``GrantCheck``
    holds it open (while the task is queued or running; by its expiry for a
    task the store does not know), if the grant is for the token's capability
    or the task is routed to it now. The token is checked again on every
    grant and every open (``TokenStandings``). Logins that are not tokens go to
    ``fallback`` (the configured shared account, whole-store access), when
    there is one.

    Parameters:
      tokens: the server's worker tokens (verified on every login, so revocation holds).
      secret: the server secret, which signs grants.
      fallback: the shared worker account, or None.
      task_state: the state of a task by id (None when unknown), or None to
        honour grants by their expiry alone.
      task_route: the queue a task is routed to now, or None to hold every
        grant to the capability it was issued for.
    """

    def __init__(
        self,
        tokens: TokenStore,
        secret: bytes,
        fallback: WorkerCredentials | None = None,
        task_state: TaskStateLookup | None = None,
        task_route: TaskRouteLookup | None = None,
    ) -> None:
        self.tokens = tokens
        self.secret = secret
        self.fallback = fallback
        self.grants = GrantCheck(secret, task_state, task_route)
        self.standings = TokenStandings(tokens)

    def methods(self, username: str) -> list[str]:
        extra = self.fallback.methods(username) if self.fallback else []
        return ["password", *[m for m in extra if m != "password"]]

    def check_password(self, username: str, password: str) -> Principal | None:
        if password.count(".") != 2:
            return self.fallback.check_password(username, password) if self.fallback else None
        try:
            claims = self.tokens.verify(password)
        except AuthError as exc:
            # verify() checks the signature first: any later reason is of a token the server signed.
            reason = str(exc)
            raise LoginRefused(reason, guess=reason.startswith("invalid worker token")) from None
        if claims["sub"] != username:
            raise LoginRefused(f"token of {claims['sub']}", guess=False)
        self.tokens.touch(claims["jti"])
        audit("token.used", token=claims["jti"], worker=username, via="sftp")
        standing = self.standings.standing(claims["jti"])
        grants = SessionGrants(self.grants, username, claims["cap"], standing)
        return Principal(username, grants, standing)

    def check_public_key(self, username: str, key: paramiko.PKey) -> Principal | None:
        return self.fallback.check_public_key(username, key) if self.fallback else None


def read_authorized_keys(path: Path) -> list[paramiko.PKey]:
    """Public keys from an OpenSSH ``authorized_keys`` file (options before the key are not supported)."""
    keys = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise SftpServerError(f"cannot read authorized keys {path}: {exc.strerror}") from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            keys.append(paramiko.PKey.from_type_string(parts[0], b64decode(parts[1])))
        except Exception:
            raise SftpServerError(f"{path}:{number}: not a public key line") from None
    return keys


# The host key.


def host_key_path(settings: Settings) -> Path:
    """The embedded server's private host key: MORAG_SFTP_SERVER_KEY_FILE, else in the data directory."""
    return settings.sftp_server_key_file or settings.data_dir / HOST_KEY_NAME


def load_host_key(path: Path) -> paramiko.PKey:
    """The server's Ed25519 host key, generated (mode 0600) on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        private = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it first
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(private)
            logger.info("sftp host key generated", extra={"path": str(path)})
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SftpServerError(f"host key {path} is readable by others (mode {mode:o}): chmod 600 it")
    try:
        return paramiko.Ed25519Key.from_private_key_file(str(path))
    except (paramiko.SSHException, ValueError) as exc:
        raise SftpServerError(f"cannot read host key {path}: {exc}") from None


def public_key_line(key: paramiko.PKey) -> str:
    """The key as a line of ``known_hosts`` or ``authorized_keys`` (``ssh-ed25519 AAAA...``)."""
    return f"{key.get_name()} {key.get_base64()}"


# Paths.


class Refused(Exception):
    """A path leaves the store or the client's grant."""


class StoreFolder:
    """The store root as clients see it: ``/`` is the root, nothing above it exists.

    Parameters:
      root: the folder served.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.realpath(root))

    def resolve(self, sftp_path: str, *, follow: bool = True) -> tuple[str, str]:
        """The store path and local path of ``sftp_path``; ``Refused`` if it leaves the store.

        ``..`` stops at the root and absolute paths start from it. With
        ``follow`` every symlink is resolved and the result must stay inside
        the store; without it the last component is taken as is (to remove or
        rename a link itself) and only its folder is resolved.
        """
        if "\x00" in sftp_path:
            raise Refused(sftp_path)
        virtual = posixpath.normpath("/" + sftp_path.lstrip("/"))
        relative = virtual.lstrip("/")
        local = os.path.join(self.root, relative) if relative else str(self.root)
        if follow or not relative:
            real = os.path.realpath(local)
        else:
            folder, name = os.path.split(local)
            real = os.path.join(os.path.realpath(folder), name)
        if real != str(self.root) and not real.startswith(str(self.root) + os.sep):
            raise Refused(sftp_path)
        relative = os.path.relpath(real, self.root).replace(os.sep, "/")
        return ("" if relative == "." else relative), real


def _errno_status(exc: OSError) -> int:
    return paramiko.SFTPServer.convert_errno(exc.errno or 0)


class StoreFile(paramiko.SFTPHandle):
    """An open file of the store, read and written with ``pread``/``pwrite`` at the client's offsets.

    The server opens every file it writes for reading too, so that it can hash
    what it holds (``check-file``); ``readable`` says whether the client may.
    A file written from empty, in order, is hashed as the writes arrive, so
    that hashing a fresh upload costs no second pass over the disk. That
    running hash is used only while the file is what this handle wrote (same
    size, modification time unchanged since its last write); otherwise the
    disk is hashed. (A change by someone else within the same tick of the
    file system's clock would go unseen here; the server hashes every output
    from disk again when the task completes.)

    Parameters:
      fd: the open file descriptor.
      path: its local path (for logs).
      flags: the open flags.
      readable: whether the client opened it for reading.
    """

    def __init__(self, fd: int, path: str, flags: int, readable: bool) -> None:
        super().__init__(flags)
        self.fd = fd
        self.path = path
        self.readable = readable
        self._closed = False
        writes = flags & (os.O_WRONLY | os.O_RDWR)
        self._digest = hashlib.sha256() if writes and os.fstat(fd).st_size == 0 else None
        self._hashed = 0
        self._written_at = 0

    def read(self, offset: int, length: int) -> bytes | int:
        if not self.readable:
            return SFTP_PERMISSION_DENIED
        try:
            return os.pread(self.fd, min(length, MAX_READ), offset)
        except OSError as exc:
            return _errno_status(exc)

    def write(self, offset: int, data: bytes) -> int:
        start = offset
        try:
            view = memoryview(data)
            while view:
                written = os.pwrite(self.fd, view, offset)
                view, offset = view[written:], offset + written
            if self._digest is not None:
                if start == self._hashed:
                    self._digest.update(data)
                    self._hashed += len(data)
                    self._written_at = os.fstat(self.fd).st_mtime_ns
                else:
                    self._digest = None  # out of order: hash the disk when asked
        except OSError as exc:
            return _errno_status(exc)
        return SFTP_OK

    def stat(self) -> paramiko.SFTPAttributes | int:
        try:
            return paramiko.SFTPAttributes.from_stat(os.fstat(self.fd))
        except OSError as exc:
            return _errno_status(exc)

    def chattr(self, attr: paramiko.SFTPAttributes) -> int:
        self._digest = None
        return _apply_attributes(self.fd, attr)

    def sha256(self, start: int, length: int) -> bytes:
        """SHA-256 of ``length`` bytes from ``start`` (to the end of file when 0)."""
        info = os.fstat(self.fd)
        end = info.st_size if length == 0 else start + length
        if (
            self._digest is not None
            and start == 0
            and end == self._hashed == info.st_size
            and info.st_mtime_ns == self._written_at
        ):
            return self._digest.copy().digest()
        digest = hashlib.sha256()
        offset = start
        while offset < end:
            chunk = os.pread(self.fd, min(HASH_BLOCK, end - offset), offset)
            if not chunk:
                break
            digest.update(chunk)
            offset += len(chunk)
        return digest.digest()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)


def _apply_attributes(target: int | str, attr: paramiko.SFTPAttributes) -> int:
    """Apply a client's SETSTAT: size and times; permission bits but never set-id bits; no owners."""
    try:
        if attr._flags & attr.FLAG_UIDGID:
            return SFTP_PERMISSION_DENIED
        if attr._flags & attr.FLAG_PERMISSIONS:
            os.chmod(target, stat.S_IMODE(attr.st_mode) & 0o777)
        if attr._flags & attr.FLAG_AMTIME:
            os.utime(target, (attr.st_atime, attr.st_mtime))
        if attr._flags & attr.FLAG_SIZE:
            os.truncate(target, attr.st_size)
    except OSError as exc:
        return _errno_status(exc)
    return SFTP_OK


class StoreHandler(paramiko.SFTPServerInterface):
    """Answers SFTP requests on the store, confined to it and to the client's grant.

    Parameters:
      server: the SSH session (``SshSession``) that authenticated the client.
      folder: the store as clients see it.
    """

    def __init__(self, server: SshSession, folder: StoreFolder, *args: Any, **kwargs: Any) -> None:
        super().__init__(server, *args, **kwargs)
        self.session = server
        self.folder = folder

    def _path(self, sftp_path: str, *, write: bool, follow: bool = True) -> str:
        return self._resolve(sftp_path, write=write, follow=follow)[1]

    def _resolve(self, sftp_path: str, *, write: bool, follow: bool = True) -> tuple[str, str]:
        """The store path and local path of a client's path, if the store and the grant allow it."""
        relative, local = self.folder.resolve(sftp_path, follow=follow)
        principal = self.session.principal
        if principal is None or not principal.grant.allows(relative, write=write):
            raise Refused(sftp_path)
        return relative, local

    def _refused(self, what: str, path: str) -> int:
        logger.warning(
            "sftp request refused",
            extra={"worker": self.session.username, "peer": self.session.peer, "op": what, "path": path},
        )
        return SFTP_PERMISSION_DENIED

    def open(self, path: str, flags: int, attr: paramiko.SFTPAttributes) -> StoreFile | int:
        writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
        try:
            local = self._path(path, write=bool(writes))
        except Refused:
            return self._refused("open", path)
        readable = not (flags & os.O_WRONLY)
        if flags & os.O_WRONLY:
            flags = (flags & ~os.O_WRONLY) | os.O_RDWR
        mode = 0o644
        if attr is not None and attr._flags & attr.FLAG_PERMISSIONS:
            mode = stat.S_IMODE(attr.st_mode) & 0o666
        try:
            fd = os.open(local, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return self._refused("open", path)
            return _errno_status(exc)
        return StoreFile(fd, local, flags, readable)

    def list_folder(self, path: str) -> list[paramiko.SFTPAttributes] | int:
        try:
            relative, local = self._resolve(path, write=False)
        except Refused:
            return self._refused("list", path)
        principal = self.session.principal
        entries = []
        try:
            for name in os.listdir(local):
                inside = f"{relative}/{name}" if relative else name
                if principal is not None and principal.grant.allows(inside, write=False):
                    found = os.lstat(os.path.join(local, name))
                    entries.append(paramiko.SFTPAttributes.from_stat(found, name))
        except OSError as exc:
            return _errno_status(exc)
        return entries

    def stat(self, path: str) -> paramiko.SFTPAttributes | int:
        try:
            return paramiko.SFTPAttributes.from_stat(os.stat(self._path(path, write=False)))
        except Refused:
            return self._refused("stat", path)
        except OSError as exc:
            return _errno_status(exc)

    def lstat(self, path: str) -> paramiko.SFTPAttributes | int:
        try:
            return paramiko.SFTPAttributes.from_stat(os.lstat(self._path(path, write=False, follow=False)))
        except Refused:
            return self._refused("lstat", path)
        except OSError as exc:
            return _errno_status(exc)

    def remove(self, path: str) -> int:
        try:
            local = self._path(path, write=True, follow=False)
            if os.path.isdir(local) and not os.path.islink(local):
                return SFTP_FAILURE
            os.remove(local)
        except Refused:
            return self._refused("remove", path)
        except OSError as exc:
            return _errno_status(exc)
        return SFTP_OK

    def rename(self, oldpath: str, newpath: str) -> int:
        try:
            source = self._path(oldpath, write=True, follow=False)
            target = self._path(newpath, write=True, follow=False)
            if os.path.lexists(target):
                return SFTP_FAILURE  # SFTP v3 rename never replaces; posix-rename does
            os.rename(source, target)
        except Refused:
            return self._refused("rename", f"{oldpath} -> {newpath}")
        except OSError as exc:
            return _errno_status(exc)
        return SFTP_OK

    def posix_rename(self, oldpath: str, newpath: str) -> int:
        try:
            source = self._path(oldpath, write=True, follow=False)
            os.replace(source, self._path(newpath, write=True, follow=False))
        except Refused:
            return self._refused("rename", f"{oldpath} -> {newpath}")
        except OSError as exc:
            return _errno_status(exc)
        return SFTP_OK

    def mkdir(self, path: str, attr: paramiko.SFTPAttributes) -> int:
        try:
            os.mkdir(self._path(path, write=True, follow=False), 0o755)
        except Refused:
            return self._refused("mkdir", path)
        except OSError as exc:
            return _errno_status(exc)
        return SFTP_OK

    def rmdir(self, path: str) -> int:
        try:
            local = self._path(path, write=True, follow=False)
            if local == str(self.folder.root):
                return SFTP_PERMISSION_DENIED
            os.rmdir(local)
        except Refused:
            return self._refused("rmdir", path)
        except OSError as exc:
            return _errno_status(exc)
        return SFTP_OK

    def chattr(self, path: str, attr: paramiko.SFTPAttributes) -> int:
        try:
            return _apply_attributes(self._path(path, write=True), attr)
        except Refused:
            return self._refused("setstat", path)

    def canonicalize(self, path: str) -> str:
        return posixpath.normpath("/" + path.lstrip("/"))

    def readlink(self, path: str) -> int:
        return SFTP_OP_UNSUPPORTED

    def symlink(self, target_path: str, path: str) -> int:
        return self._refused("symlink", path)


#: Requests that carry an ATTRS block, and the fields before it ("s" a string, "u" a uint32).
_ATTRS_AFTER = {CMD_OPEN: "su", CMD_MKDIR: "s", CMD_SETSTAT: "s", CMD_FSETSTAT: "s"}
#: Bytes of the ATTRS fields each flag adds (size; uid and gid; permissions; atime and mtime).
_ATTR_FIELDS = (
    (paramiko.SFTPAttributes.FLAG_SIZE, 8),
    (paramiko.SFTPAttributes.FLAG_UIDGID, 8),
    (paramiko.SFTPAttributes.FLAG_PERMISSIONS, 4),
    (paramiko.SFTPAttributes.FLAG_AMTIME, 8),
)


def attributes_fit(payload: bytes, request: int) -> bool:
    """Whether the ATTRS block of a ``request`` (open, mkdir, setstat, fsetstat) with this
    ``payload`` declares no more extended attributes than the bytes left can hold (each takes 8
    at least).

    paramiko reads the declared count one pair at a time and pads a short
    message with zeros, so a count of 2^32 - 1 in a small packet keeps a
    server thread busy for hours. A payload too short to say is left to
    paramiko, which answers it as it does.
    """
    at = 0

    def uint32() -> int:
        nonlocal at
        if at + 4 > len(payload):
            raise IndexError
        value = int.from_bytes(payload[at : at + 4], "big")
        at += 4
        return value

    try:
        for kind in _ATTRS_AFTER[request]:
            length = uint32()
            if kind == "s":
                at += length
        flags = uint32()
        at += sum(size for flag, size in _ATTR_FIELDS if flags & flag)
        if not flags & paramiko.SFTPAttributes.FLAG_EXTENDED:
            return True
        return uint32() * 8 <= len(payload) - at
    except IndexError:
        return True


class StoreSftpServer(paramiko.SFTPServer):
    """paramiko's SFTP subsystem with the ``check-file`` extension answered in SHA-256.

    The client sends ``check-file`` with an open handle, the algorithms it
    accepts, an offset and a length; the reply is the SHA-256 of that range
    as the server reads it from its own disk.
    """

    def _send_server_version(self) -> int:
        kind, data = self._read_packet()
        if kind != CMD_INIT:
            raise SFTPError("client did not start with SSH_FXP_INIT")
        reply = paramiko.Message()
        reply.add_int(SFTP_VERSION)
        extensions = (
            ("check-file", "sha256"),
            ("posix-rename@openssh.com", "1"),
            (GRANT_EXTENSION, "1"),
            (GRANT_RELEASE_EXTENSION, "1"),
        )
        for name, value in extensions:
            reply.add_string(name)
            reply.add_string(value)
        self._send_packet(CMD_VERSION, reply)
        return int.from_bytes(data[:4], "big")

    def _process(self, t: int, request_number: int, msg: paramiko.Message) -> None:
        session: SshSession = self.server.session
        session.touch()  # a request, answered or not, keeps the connection from idling out
        try:
            self._answer(t, request_number, msg)
        finally:
            session.touch()

    def _answer(self, t: int, request_number: int, msg: paramiko.Message) -> None:
        if t in _ATTRS_AFTER and not attributes_fit(msg.packet.getvalue()[msg.packet.tell() :], t):
            self._send_status(request_number, SFTP_BAD_MESSAGE, "more extended attributes than it holds")
            return
        if t == CMD_READ:
            self._read(request_number, msg)
            return
        if t == CMD_EXTENDED:
            start = msg.packet.tell()
            name = msg.get_text()
            if name == "check-file":
                self._check_file_sha256(request_number, msg)
                return
            if name == GRANT_EXTENSION:
                self._add_grant(request_number, msg)
                return
            if name == GRANT_RELEASE_EXTENSION:
                self._release_grant(request_number, msg)
                return
            msg.packet.seek(start)
        super()._process(t, request_number, msg)

    def _read(self, request_number: int, msg: paramiko.Message) -> None:
        """Answer a read with the file's bytes read straight behind the reply's header.

        Serving reads is what limits the server; building the reply in place
        saves the copies a generic message takes on its way to the channel.
        """
        handle = msg.get_binary()
        offset = msg.get_int64()
        length = min(msg.get_int(), MAX_READ)
        opened = self.file_table.get(handle)
        if not isinstance(opened, StoreFile):
            self._send_status(request_number, SFTP_BAD_MESSAGE, "Invalid handle")
            return
        if not opened.readable:
            self._send_status(request_number, SFTP_PERMISSION_DENIED)
            return
        reply = bytearray(_DATA_HEADER.size + length)
        try:
            size = os.preadv(opened.fd, [memoryview(reply)[_DATA_HEADER.size :]], offset)
        except OSError as exc:
            self._send_status(request_number, _errno_status(exc))
            return
        if size == 0:
            self._send_status(request_number, SFTP_EOF)
            return
        # uint32 length, byte type, uint32 request id, string data (uint32 length, bytes)
        _DATA_HEADER.pack_into(reply, 0, _DATA_HEADER.size - 4 + size, CMD_DATA, request_number, size)
        self._write_all(memoryview(reply)[: _DATA_HEADER.size + size])

    def _add_grant(self, request_number: int, msg: paramiko.Message) -> None:
        """``grant@morag-pipeline``: the client presents a task's transfer grant.

        A refusal says why: ``permission denied`` when the grant will never
        open its task (forged, its task ended, expired, the worker's token
        revoked), ``failure`` when the client may try again (the task's state
        cannot be read just now, or the task is open but not routed to the
        worker's capability: its move to that queue may not be recorded yet).
        """
        token = msg.get_text()
        session: SshSession = self.server.session
        grants = session.principal.grant if session.principal else None
        if not isinstance(grants, SessionGrants):
            self._send_status(request_number, SFTP_OK, "this login already reaches the whole store")
            return
        try:
            grant = grants.add(token)
        except GrantRefused as exc:
            audit("sftp.grant_refused", worker=session.username, reason=str(exc))
            if exc.retryable:
                self._send_status(request_number, SFTP_FAILURE, str(exc))
                return
            self._send_status(request_number, SFTP_PERMISSION_DENIED, str(exc))
            return
        logger.info("sftp grant", extra={"worker": session.username, "task_id": grant.task})
        self._send_status(request_number, SFTP_OK, "granted")

    def _release_grant(self, request_number: int, msg: paramiko.Message) -> None:
        """``grant-release@morag-pipeline``: the client is done with a task; its grant is forgotten."""
        task_id = msg.get_text()
        session: SshSession = self.server.session
        grants = session.principal.grant if session.principal else None
        if isinstance(grants, SessionGrants) and grants.release(task_id):
            logger.info("sftp grant released", extra={"worker": session.username, "task_id": task_id})
        self._send_status(request_number, SFTP_OK, "released")

    def _check_file_sha256(self, request_number: int, msg: paramiko.Message) -> None:
        handle = msg.get_binary()
        algorithms = msg.get_text().split(",")
        start = msg.get_int64()
        length = msg.get_int64()
        block_size = msg.get_int()
        opened = self.file_table.get(handle)
        if not isinstance(opened, StoreFile):
            self._send_status(request_number, SFTP_BAD_MESSAGE, "Invalid handle")
            return
        if "sha256" not in algorithms:
            self._send_status(request_number, SFTP_OP_UNSUPPORTED, "only sha256 is supported")
            return
        if block_size and (length == 0 or block_size < length):
            self._send_status(request_number, SFTP_OP_UNSUPPORTED, "one hash per request only")
            return
        try:
            digest = opened.sha256(start, length)
        except OSError as exc:
            self._send_status(request_number, _errno_status(exc), "cannot hash file")
            return
        reply = paramiko.Message()
        reply.add_int(request_number)
        reply.add_string("check-file")
        reply.add_string("sha256")
        reply.add_bytes(digest)
        self._send_packet(CMD_EXTENDED_REPLY, reply)


class SshSession(paramiko.ServerInterface):
    """One client connection: authenticates it and allows only SFTP sessions.

    paramiko asks about a public key before it checks the client's signature,
    so a login only counts once paramiko reports the connection authenticated:
    the principal is settled when the client opens its session.

    Every login attempt asks ``throttle`` first: while the client's address is
    refused, no credential is checked. Each refused password counts as one
    failure of the address; refused public keys count once per connection
    (an OpenSSH client offers each key it holds in turn); a refused worker
    token that the server did sign (revoked, expired) does not count. Refusals
    are logged and audited with the address and the reason, never the
    credential; those that the throttle does not bound are held back by
    ``limiter``.

    Parameters:
      authenticator: who may log in.
      peer: the client's address and port, for logs.
      transport: the client's SSH connection.
      address: the client's address, by which failed logins are counted.
      throttle: failed logins by address.
      limiter: holds back repeated log records of the same refusal.
      on_login: called once, when the client has logged in.
    """

    def __init__(
        self,
        authenticator: Authenticator,
        peer: str,
        transport: paramiko.Transport,
        address: str,
        throttle: LoginThrottle,
        limiter: LogLimiter,
        on_login: Callable[[SshSession], None] | None = None,
    ) -> None:
        self.authenticator = authenticator
        self.peer = peer
        self.transport = transport
        self.address = address
        self.throttle = throttle
        self.limiter = limiter
        self.on_login = on_login
        self.username: str | None = None
        self.principal: Principal | None = None
        self.opened_at = time.monotonic()
        self.last_request = self.opened_at
        self._accepted: dict[str, tuple[Principal, str]] = {}
        self._key_refused = False

    def touch(self) -> None:
        """The client made an SFTP request: it is not idle."""
        self.last_request = time.monotonic()

    def get_allowed_auths(self, username: str) -> str:
        return ",".join(self.authenticator.methods(username))

    def check_auth_password(self, username: str, password: str) -> int:
        return self._login(
            username, "password", lambda: self.authenticator.check_password(username, password)
        )

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        return self._login(username, "publickey", lambda: self.authenticator.check_public_key(username, key))

    def _login(self, username: str, method: str, check: Callable[[], Principal | None]) -> int:
        """Ask the throttle, then ``check``; count and record a refusal."""
        wait = self.throttle.refused_for(self.address)
        if wait:
            reason = f"too many failed logins from {self.address}: refused for {wait:.0f} s more"
            self._refused(username, method, reason, kind="throttled")
            return paramiko.AUTH_FAILED
        try:
            principal = check()
            reason, guess = "credentials not accepted", True
        except LoginRefused as exc:
            principal, reason, guess = None, exc.reason, exc.guess
        if principal is not None:
            self._accepted[username] = (principal, method)
            return paramiko.AUTH_SUCCESSFUL
        self._refused(username, method, reason, kind=None if guess else reason)
        if guess and (method == "password" or not self._key_refused):
            backoff = self.throttle.failed(self.address)
            if backoff:
                logger.warning(
                    "sftp logins refused from an address for a while",
                    extra={"peer": self.address, "backoff_s": backoff},
                )
                audit("sftp.login_throttled", peer=self.address, backoff_s=backoff)
        if method == "publickey":
            self._key_refused = True
        return paramiko.AUTH_FAILED

    def _refused(self, username: str, method: str, reason: str, *, kind: str | None) -> None:
        """Log and audit a refused login; of a ``kind``, at most one per address every ``LOG_EVERY_S``."""
        held_back = self.limiter.allow((self.address, kind)) if kind is not None else 0
        if held_back is None:
            return
        extra = {"worker": username, "peer": self.peer, "method": method, "reason": reason}
        logger.warning("sftp login refused", extra={**extra, "held_back": held_back})
        audit("sftp.login_refused", worker=username, peer=self.address, method=method, reason=reason)

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind != "session" or not self.transport.is_authenticated():
            return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        username = self.transport.get_username()
        if username not in self._accepted:
            return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        if self.principal is None:
            self.username = username
            self.principal, method = self._accepted[username]
            self.touch()
            self.throttle.succeeded(self.address)
            if self.on_login is not None:
                self.on_login(self)
            logger.info("sftp login", extra={"worker": username, "peer": self.peer, "method": method})
            if isinstance(self.principal.grant, WholeStore):
                audit("sftp.login", worker=username, peer=self.address, method=method, reach="whole store")
        return paramiko.OPEN_SUCCEEDED


class SftpServer:
    """Serves a store folder over SFTP on a TCP port, each connection in its own threads.

    It holds to ``limits``: a connection beyond ``max_connections``, or beyond
    ``max_preauth_per_peer`` connections of its address that have not logged
    in, is closed as soon as it is accepted (logged at most every
    ``LOG_EVERY_S`` per address). An address that failed to log in
    ``login_failures_per_peer`` times is refused for a while (``LoginThrottle``).

    A watcher thread closes, every ``WATCH_INTERVAL_S``, each connection that
    has not logged in ``handshake_timeout_s`` after it was accepted, each
    logged-in connection without an SFTP request for ``idle_timeout_s``, and
    each session whose principal's credential no longer stands (a revoked
    worker token): the worker is cut off mid-transfer, and its token logs in
    no more.

    Parameters:
      root: the folder served as ``/``.
      host_key: the server's private host key.
      authenticator: who may log in, and what they may touch.
      host: the address to listen on.
      port: the port (0 picks a free one; see ``port`` once started).
      limits: connections, logins and timeouts allowed (default: ``SftpLimits()``).
    """

    def __init__(
        self,
        root: Path,
        host_key: paramiko.PKey,
        authenticator: Authenticator,
        host: str = "127.0.0.1",
        port: int = 2222,
        limits: SftpLimits | None = None,
    ) -> None:
        self.folder = StoreFolder(root)
        self.host_key = host_key
        self.authenticator = authenticator
        self.host = host
        self.port = port
        self.limits = limits or SftpLimits()
        self.throttle = LoginThrottle(
            self.limits.login_failures_per_peer, self.limits.login_backoff_s, self.limits.login_backoff_max_s
        )
        self._log_limiter = LogLimiter()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._sessions: dict[paramiko.Transport, SshSession] = {}
        self._preauth: dict[str, set[paramiko.Transport]] = {}  # by address: connections not logged in
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def fingerprint(self) -> str:
        """The host key's SHA-256 fingerprint, as OpenSSH prints it (``SHA256:...``)."""
        return self.host_key.fingerprint

    @property
    def serving(self) -> bool:
        """Whether it accepts connections (started, not stopped, its accept thread alive)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    @property
    def connections(self) -> int:
        """Connections open, logged in or not."""
        with self._lock:
            return sum(1 for t in self._sessions if t.is_active())

    @property
    def logins(self) -> list[str]:
        """The names of the clients logged in on the connections still open."""
        with self._lock:
            sessions = list(self._sessions.items())
        return [s.username for t, s in sessions if s.username is not None and t.is_active()]

    def start(self) -> None:
        try:
            listener = socket.create_server((self.host, self.port), reuse_port=False, backlog=LISTEN_BACKLOG)
        except OSError as exc:
            raise SftpServerError(f"cannot listen on {self.host}:{self.port}: {exc.strerror}") from None
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name="sftp-accept", daemon=True)
        self._thread.start()
        self._watcher = threading.Thread(target=self._watch, name="sftp-watch", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        """Stop listening and close every connection."""
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            self._listener.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            transports = list(self._sessions)
        for transport in transports:
            transport.close()
        if self._watcher is not None:
            self._watcher.join(timeout=5)

    def __enter__(self) -> SftpServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, address = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            host = address[0]
            with self._lock:
                refusal = self._refusal(host)
            if refusal is not None:
                sock.close()
                held_back = self._log_limiter.allow((host, refusal))
                if held_back is not None:
                    logger.warning(
                        "sftp connection refused",
                        extra={"peer": host, "reason": refusal, "held_back": held_back},
                    )
                continue
            try:
                self._serve(sock, host, address[1])
            except Exception as exc:  # never let one connection stop the server
                logger.warning("cannot serve an sftp connection", extra={"peer": host, "error": str(exc)})
                sock.close()

    def _serve(self, sock: socket.socket, host: str, port: int) -> None:
        """Start the SSH server side of an accepted connection, in paramiko's own thread."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = paramiko.Transport(
            sock, default_window_size=WINDOW_SIZE, default_max_packet_size=MAX_PACKET_SIZE
        )
        transport.set_log_channel(PARAMIKO_LOG)
        timeout = self.limits.handshake_timeout_s
        transport.banner_timeout = transport.handshake_timeout = transport.auth_timeout = timeout
        transport.add_server_key(self.host_key)
        transport.set_subsystem_handler("sftp", StoreSftpServer, StoreHandler, self.folder)
        session = SshSession(
            self.authenticator,
            f"{host}:{port}",
            transport,
            host,
            self.throttle,
            self._log_limiter,
            self._logged_in,
        )
        # Only this thread adds connections, so the check of the caps still holds. The lock is
        # held until paramiko's thread runs, so that the watcher never sees it not started.
        with self._lock:
            self._sessions[transport] = session
            self._preauth.setdefault(host, set()).add(transport)
            transport.start_server(threading.Event(), server=session)

    def _refusal(self, host: str) -> str | None:
        """Why a new connection from ``host`` is refused, or None (called with the lock held)."""
        if len(self._sessions) >= self.limits.max_connections:
            self._forget_closed(list(self._sessions))
            if len(self._sessions) >= self.limits.max_connections:
                return "too many connections"
        waiting = self._preauth.get(host)
        if waiting is not None and len(waiting) >= self.limits.max_preauth_per_peer:
            self._forget_closed(list(waiting))
            if len(self._preauth.get(host, ())) >= self.limits.max_preauth_per_peer:
                return "too many connections from this address that have not logged in"
        return None

    def _forget_closed(self, transports: list[paramiko.Transport]) -> None:
        """Drop the closed ones of ``transports`` from the books (called with the lock held)."""
        for transport in transports:
            if transport.is_active():
                continue
            session = self._sessions.pop(transport, None)
            if session is None or session.principal is not None:
                continue
            self._leave_preauth(session)
            error = transport.get_exception()
            if (
                error is not None
                and self._log_limiter.allow((session.address, "closed before login")) is not None
            ):
                logger.info(
                    "sftp connection closed before login", extra={"peer": session.peer, "error": str(error)}
                )

    def _leave_preauth(self, session: SshSession) -> None:
        waiting = self._preauth.get(session.address)
        if waiting is not None:
            waiting.discard(session.transport)
            if not waiting:
                del self._preauth[session.address]

    def _logged_in(self, session: SshSession) -> None:
        with self._lock:
            self._leave_preauth(session)

    def _watch(self) -> None:
        """Every ``WATCH_INTERVAL_S``: close connections late to log in, idle, or whose credential fell."""
        while not self._stopping.wait(WATCH_INTERVAL_S):
            with self._lock:
                self._forget_closed(list(self._sessions))
                sessions = list(self._sessions.items())
            now = time.monotonic()
            for transport, session in sessions:
                try:
                    self._check(transport, session, now)
                except Exception as exc:  # never let one session stop the watcher
                    logger.warning(
                        "cannot check an sftp session", extra={"peer": session.peer, "error": str(exc)}
                    )

    def _check(self, transport: paramiko.Transport, session: SshSession, now: float) -> None:
        """Close ``transport`` if it is late to log in, idle, or its credential no longer stands."""
        principal = session.principal
        if principal is None:
            if now - session.opened_at >= self.limits.handshake_timeout_s:
                transport.close()
                held_back = self._log_limiter.allow((session.address, "not logged in in time"))
                if held_back is not None:
                    logger.info(
                        "sftp connection closed: not logged in in time",
                        extra={
                            "peer": session.peer,
                            "timeout_s": self.limits.handshake_timeout_s,
                            "held_back": held_back,
                        },
                    )
            return
        idle = now - session.last_request
        if idle >= self.limits.idle_timeout_s:
            logger.info(
                "sftp connection closed: idle",
                extra={"worker": session.username, "peer": session.peer, "idle_s": round(idle, 1)},
            )
            transport.close()
            return
        if principal.standing is None:
            return
        reason = principal.standing()
        if reason is None:
            return
        logger.warning(
            "sftp session closed",
            extra={"worker": session.username, "peer": session.peer, "reason": reason},
        )
        audit("sftp.session_closed", worker=session.username, reason=reason)
        transport.close()


def start_sftp_server(
    settings: Settings,
    root: Path,
    tokens: TokenStore | None = None,
    task_state: TaskStateLookup | None = None,
    task_route: TaskRouteLookup | None = None,
) -> SftpServer:
    """Start the embedded SFTP server the settings describe, serving ``root``, within their limits.

    With ``tokens``, enrolled workers log in with their tokens and reach only
    the tasks whose grants they present. The shared account of the settings
    (``sftp_username`` with ``sftp_password`` or ``sftp_authorized_keys``)
    reaches the whole store; it is served only when ``sftp_shared_account``
    is true, with a warning. With ``task_state`` a grant stays open while its
    task is queued or running, whatever its age, and closes when the task
    ends. With ``task_route`` a worker of the queue a task was rerouted to may
    present the grant signed for the first one.
    """
    key = load_host_key(host_key_path(settings))
    shared = shared_account(settings)
    authenticator: Authenticator
    if tokens is not None:
        authenticator = TokenLogins(tokens, tokens.secret, shared, task_state, task_route)
    elif shared is not None:
        authenticator = shared
    else:
        logger.warning(
            "no SFTP worker logins: enroll workers with tokens, or serve the shared account "
            "(MORAG_SFTP_SHARED_ACCOUNT=true); every login is refused until then"
        )
        authenticator = WorkerCredentials(settings.sftp_username)
    limits = SftpLimits.from_settings(settings)
    server = SftpServer(root, key, authenticator, settings.sftp_listen_host, settings.sftp_port, limits)
    server.start()
    logger.info(
        "sftp server listening",
        extra={
            "address": f"{server.host}:{server.port}",
            "fingerprint": server.fingerprint,
            "host_key": public_key_line(key),
            "shared_account": shared is not None,
        },
    )
    return server


def shared_account(settings: Settings) -> WorkerCredentials | None:
    """The shared worker account, when the settings serve it (``sftp_shared_account``); None otherwise.

    A password or keys configured without the flag are not served, and that
    is logged; so is serving it, since it reaches the whole store.
    """
    configured = settings.sftp_password is not None or settings.sftp_authorized_keys is not None
    if not settings.sftp_shared_account:
        if configured:
            logger.warning(
                "the shared SFTP account is configured but not served: set MORAG_SFTP_SHARED_ACCOUNT=true "
                "to serve it (it reaches the whole store), or remove its password and keys"
            )
        return None
    credentials = WorkerCredentials.from_settings(settings)
    if not credentials.methods(settings.sftp_username):
        logger.warning(
            "MORAG_SFTP_SHARED_ACCOUNT is true but the account has no password or keys: "
            "set MORAG_SFTP_PASSWORD or MORAG_SFTP_AUTHORIZED_KEYS; it is not served"
        )
        return None
    logger.warning(
        "the shared SFTP account is served: it reads and writes the whole store, every task's files",
        extra={"worker": settings.sftp_username, "methods": credentials.methods(settings.sftp_username)},
    )
    return credentials
