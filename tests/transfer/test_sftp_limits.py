"""The embedded SFTP server's limits: a flood from one address does not keep an enrolled worker from
its files; an address that keeps failing to log in is refused for a while; a connection that does
not log in, or sits idle once logged in, is closed; the server serves a bounded number of
connections; a fleet behind one address logs in freely."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from pipeline.config import Settings
from pipeline.security.grants import issue_grant
from pipeline.security.tokens import TokenStore
from pipeline.store import State, Task, TaskStore
from pipeline.transfer.checksums import sha256_file
from pipeline.transfer.local import LocalStore
from pipeline.transfer.serving import FileServices
from pipeline.transfer.sftp_client import SftpTransport
from pipeline.transfer.sftp_limits import LOG_EVERY_S, LoginThrottle, SftpLimits
from pipeline.transfer.sftp_server import SftpServer, TokenLogins, WorkerCredentials
from tests.conftest import wait_for
from tests.transfer.conftest import PASSWORD, SERVER_SECRET, USER, put_input, worker_settings
from tests.transfer.openssh import free_port

#: The address the hostile peer connects from (Linux answers on all of 127.0.0.0/8).
FLOODER = "127.0.0.2"
#: Another address, of a client that did nothing wrong.
BYSTANDER = "127.0.0.3"
#: A wrong password, distinct enough to look for in the logs.
WRONG = "not-the-password-9f3a"
#: What the server logs when it starts refusing an address's logins for a while.
THROTTLED = "sftp logins refused from an address for a while"


def connect_from(source: str, port: int) -> paramiko.Transport:
    """An SSH connection to the server from ``source``, its handshake done, not logged in."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    transport = paramiko.Transport(sock)
    try:
        transport.start_client(timeout=10)
    except BaseException:
        transport.close()
        raise
    return transport


def log_in(transport: paramiko.Transport, username: str, password: str) -> paramiko.SFTPClient:
    """Log in with a password and open the SFTP session; AuthenticationException if refused."""
    transport.auth_password(username, password)
    sftp = paramiko.SFTPClient.from_transport(transport)
    assert sftp is not None
    return sftp


def logged_in_from(source: str, port: int, password: str = PASSWORD) -> paramiko.Transport | None:
    """A logged-in connection from ``source`` with an SFTP session, or None if it was refused."""
    try:
        transport = connect_from(source, port)
    except (paramiko.SSHException, EOFError, OSError):
        return None
    try:
        log_in(transport, USER, password).listdir("/")
    except (paramiko.SSHException, EOFError, OSError):
        transport.close()
        return None
    return transport


class Knock:
    """A TCP connection that says nothing, from ``source``: it sees the server's SSH banner if
    the server takes it on, or only the close if the server turns it away at the door."""

    def __init__(self, source: str, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        self.sock.setblocking(False)
        self.greeted = self.closed = False

    def poll(self) -> bool:
        """Read what arrived; whether the server has answered (greeted or closed) by now."""
        try:
            while self.sock.recv(4096):
                self.greeted = True
            self.closed = True
        except BlockingIOError:
            pass
        except OSError:
            self.closed = True
        return self.greeted or self.closed


@contextlib.contextmanager
def limited_server(store: LocalStore, host_key: paramiko.PKey, **limits: float) -> Iterator[SftpServer]:
    """The embedded server with the shared test account and ``limits`` (the rest as by default)."""
    credentials = WorkerCredentials(USER, PASSWORD)
    with SftpServer(store.root, host_key, credentials, "127.0.0.1", 0, SftpLimits(**limits)) as server:  # type: ignore[arg-type]
        yield server


# The flood: an enrolled worker keeps its files while one address floods the server.


@pytest.fixture
def server_settings(tmp_path: Path) -> Settings:
    """``morag-pipeline server``'s settings: the default limits, no shared account."""
    return Settings(data_dir=tmp_path / "server", sftp_port=free_port(), grant_ttl_s=600)


def hammer(port: int, stop: threading.Event) -> None:
    """Log in from ``FLOODER`` with wrong passwords, again and again, until ``stop``."""
    while not stop.is_set():
        try:
            transport = connect_from(FLOODER, port)
        except (paramiko.SSHException, EOFError, OSError):
            stop.wait(0.05)  # refused at the door: try again
            continue
        try:
            for _ in range(3):
                with contextlib.suppress(paramiko.AuthenticationException):
                    transport.auth_password("gpu-box", "a.wrong.guess")
        except (paramiko.SSHException, EOFError, OSError):
            pass
        finally:
            transport.close()


def test_a_flood_from_one_address_does_not_keep_an_enrolled_worker_from_its_files(
    server_settings: Settings,
    served: FileServices,
    tasks: TaskStore,
    files: LocalStore,
    tokens: TokenStore,
    payload: bytes,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Hundreds of idle connections and a stream of wrong passwords from 127.0.0.2; the enrolled
    worker at 127.0.0.1 downloads and uploads 3 MB and both verify; the flooder holds no more
    connections than its address's cap, and the log carries a few lines, not one per connection."""
    assert served.sftp is not None
    port, cap = served.sftp.port, server_settings.sftp_max_preauth_per_peer
    ref = put_input(files, "t1", "in.bin", payload)
    tasks.create(Task("t1", "transcribe", State.queued, "in.bin", ref.to_dict(), {}, {"queue": "gpu"}))
    token, _ = tokens.issue("gpu-box", "gpu", 3600)
    worker = SftpTransport(
        worker_settings(
            tmp_path, port, worker_token=token, sftp_password=None, sftp_host_key=served.sftp.fingerprint
        )
    )
    stop = threading.Event()
    hammers = [threading.Thread(target=hammer, args=(port, stop)) for _ in range(2)]
    flood: list[Knock] = []
    started = time.monotonic()
    try:
        with caplog.at_level(logging.INFO, logger="pipeline"):
            for thread in hammers:
                thread.start()
            wait_for(
                "the wrong passwords to get the flooding address refused for a while",
                lambda: any(r.getMessage() == THROTTLED and r.peer == FLOODER for r in caplog.records),  # type: ignore[attr-defined]
                timeout=60,
            )
            flood = [Knock(FLOODER, port) for _ in range(300)]

            worker.authorize("t1", issue_grant(SERVER_SECRET, "t1", [ref.path], 600, "gpu"))
            local = worker.download(ref, tmp_path / "in.bin")
            assert sha256_file(local) == ref.sha256
            (tmp_path / "out.bin").write_bytes(payload[::-1])
            uploaded = worker.upload(tmp_path / "out.bin", files.output_path("t1", "out.bin"))
            files.check(uploaded)  # the server's copy has the worker's size and SHA-256

            wait_for("the server to answer every flooding connection", lambda: all(k.poll() for k in flood))
            turned_away = [k for k in flood if k.closed and not k.greeted]
            assert len(flood) - cap <= len(turned_away) < len(flood)
    finally:
        stop.set()
        for thread in hammers:
            thread.join(timeout=30)
        for knock in flood:
            knock.sock.close()
        worker.close()
    elapsed = time.monotonic() - started
    refused = [
        r
        for r in caplog.records
        if r.getMessage() == "sftp connection refused" and r.peer == FLOODER  # type: ignore[attr-defined]
    ]
    assert (
        1 <= len(refused) <= 2 + elapsed / LOG_EVERY_S
    )  # a line per address per interval, not one per connection


# Failed logins: an address that keeps failing is refused for a while; others are not.


def test_an_address_that_keeps_failing_to_log_in_is_refused_even_the_right_password_for_a_while(
    store: LocalStore, host_key: paramiko.PKey, caplog: pytest.LogCaptureFixture
) -> None:
    """After 3 wrong passwords from 127.0.0.2 the right one from there is refused too, unchecked,
    while 127.0.0.3 logs in; once the backoff has passed it logs in, and that success forgets
    its failures."""
    with limited_server(store, host_key, login_failures_per_peer=3, login_backoff_s=5) as server:
        flooder = connect_from(FLOODER, server.port)
        try:
            with caplog.at_level(logging.INFO, logger="pipeline"):
                for _ in range(3):
                    with pytest.raises(paramiko.AuthenticationException):
                        flooder.auth_password(USER, WRONG)
                with pytest.raises(paramiko.AuthenticationException):
                    log_in(flooder, USER, PASSWORD)  # the right password, refused without a look
        finally:
            flooder.close()
        refusal = next(
            r for r in caplog.records if r.getMessage() == "sftp login refused" and "too many" in r.reason
        )  # type: ignore[attr-defined]
        assert refusal.peer.startswith(f"{FLOODER}:") and refusal.worker == USER  # type: ignore[attr-defined]
        assert PASSWORD not in caplog.text and WRONG not in caplog.text  # never the secret presented
        assert any(r.getMessage() == THROTTLED and r.peer == FLOODER for r in caplog.records)  # type: ignore[attr-defined]

        bystander = logged_in_from(BYSTANDER, server.port)
        assert bystander is not None  # another address is not held to the flooder's failures
        bystander.close()

        # Refused attempts while it waits are not counted: asking again does not prolong the wait.
        back = wait_for(
            "the backoff to pass", lambda: logged_in_from(FLOODER, server.port), timeout=60, interval=1
        )
        back.close()
        # The success forgot the failures: one more wrong password does not get the address refused.
        again = connect_from(FLOODER, server.port)
        try:
            with pytest.raises(paramiko.AuthenticationException):
                again.auth_password(USER, WRONG)
            log_in(again, USER, PASSWORD).listdir("/")
        finally:
            again.close()


def test_login_backoff_doubles_up_to_its_cap_and_is_forgotten_and_bounded() -> None:
    """The throttle's arithmetic, on a clock the test moves: refused after N failures for the first
    backoff, doubled with each further failure up to the cap, reset by a success, forgotten after
    a quiet spell, and never remembering more addresses than its bound."""
    now = [1000.0]
    throttle = LoginThrottle(failures=3, backoff_s=2, backoff_max_s=30, max_peers=100, clock=lambda: now[0])
    assert [throttle.failed("a") for _ in range(3)] == [0, 0, 2]
    assert throttle.refused_for("a") == 2 and throttle.refused_for("b") == 0
    now[0] += 2
    assert throttle.refused_for("a") == 0
    assert [throttle.failed("a") for _ in range(5)] == [4, 8, 16, 30, 30]
    throttle.succeeded("a")
    assert throttle.refused_for("a") == 0 and throttle.failed("a") == 0  # counting starts again
    now[0] += 30 + 30  # its refusal over, then a full cap's quiet: forgotten
    assert [throttle.failed("a") for _ in range(3)] == [0, 0, 2]
    for peer in range(1000):
        throttle.failed(f"10.0.{peer // 256}.{peer % 256}")
    assert len(throttle) == 100


def test_a_revoked_token_does_not_lock_out_the_workers_that_share_its_address(
    store: LocalStore, host_key: paramiko.PKey, tmp_path: Path
) -> None:
    """A box whose token was revoked keeps trying from 127.0.0.1; the fleet behind that address
    still logs in. Tokens that are not the server's (a guess) do count."""
    tokens = TokenStore(tmp_path / "server" / "tasks.db", SERVER_SECRET)
    limits = SftpLimits(login_failures_per_peer=2, login_backoff_s=60)
    with SftpServer(
        store.root, host_key, TokenLogins(tokens, SERVER_SECRET), "127.0.0.1", 0, limits
    ) as server:
        revoked, record = tokens.issue("old-box", "gpu", 3600)
        tokens.revoke(record.id)
        good, _ = tokens.issue("gpu-box", "gpu", 3600)
        for _ in range(5):
            transport = connect_from("127.0.0.1", server.port)
            with pytest.raises(paramiko.AuthenticationException):
                transport.auth_password("old-box", revoked)
            transport.close()
        transport = connect_from("127.0.0.1", server.port)
        assert log_in(transport, "gpu-box", good).normalize(".") == "/"  # logged in: its session is open
        transport.close()

        forged = good.rsplit(".", 1)[0] + ".forged-signature"
        transport = connect_from(FLOODER, server.port)
        for _ in range(2):
            with pytest.raises(paramiko.AuthenticationException):
                transport.auth_password("gpu-box", forged)
        with pytest.raises(paramiko.AuthenticationException):
            log_in(transport, "gpu-box", good)
        transport.close()


# Timeouts: a connection must log in soon; a logged-in one must not sit idle.


def test_a_connection_that_does_not_log_in_is_closed_after_the_handshake_timeout(
    store: LocalStore, host_key: paramiko.PKey
) -> None:
    """One client finishes the SSH handshake and never logs in, another never even says hello:
    both are closed, and their address's slots come free."""
    with limited_server(store, host_key, handshake_timeout_s=1, max_preauth_per_peer=2) as server:
        lingering = connect_from(FLOODER, server.port)
        silent = Knock(FLOODER, server.port)
        try:
            wait_for(
                "the client that did not log in to be closed", lambda: not lingering.is_active(), timeout=30
            )
            wait_for("the silent client to be closed", lambda: silent.poll() and silent.closed, timeout=30)
        finally:
            lingering.close()
            silent.sock.close()
        after = logged_in_from(FLOODER, server.port)
        assert after is not None
        after.close()


def test_an_idle_logged_in_connection_is_closed_and_the_worker_reconnects(
    store: LocalStore, host_key: paramiko.PKey, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With a 1 s idle timeout an enrolled worker that stops asking is cut off (logged), a client
    that keeps asking is not; the worker's next transfer reconnects on its own and presents its
    task's grant again, without which the server would refuse the read."""
    tokens = TokenStore(tmp_path / "server" / "tasks.db", SERVER_SECRET)
    ref = put_input(store, "t1", "in.bin", b"first and second")
    logins, limits = TokenLogins(tokens, SERVER_SECRET), SftpLimits(idle_timeout_s=1)
    with SftpServer(store.root, host_key, logins, "127.0.0.1", 0, limits) as server:
        token, _ = tokens.issue("gpu-box", "gpu", 3600)
        other, _ = tokens.issue("cpu-box", "cpu", 3600)
        worker = SftpTransport(
            worker_settings(
                tmp_path,
                server.port,
                worker_token=token,
                sftp_password=None,
                sftp_host_key=server.fingerprint,
            )
        )
        busy = connect_from("127.0.0.1", server.port)
        busy_sftp = log_in(busy, "cpu-box", other)
        stop = threading.Event()

        def keep_asking() -> None:
            while not stop.wait(0.05):
                with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                    busy_sftp.normalize(".")

        asker = threading.Thread(target=keep_asking)
        asker.start()
        try:
            with caplog.at_level(logging.INFO, logger="pipeline"):
                worker.authorize("t1", issue_grant(SERVER_SECRET, "t1", [ref.path], 600, "gpu"))
                assert worker.download(ref, tmp_path / "first").read_bytes() == b"first and second"
                wait_for(
                    "the idle worker's connection to be closed",
                    lambda: any(
                        r.getMessage() == "sftp connection closed: idle" and r.worker == "gpu-box"  # type: ignore[attr-defined]
                        for r in caplog.records
                    ),
                    timeout=30,
                )
                wait_for("the server to drop it", lambda: server.logins == ["cpu-box"], timeout=30)
            assert busy.is_active()  # the connection that kept asking is still served
            assert worker.download(ref, tmp_path / "second").read_bytes() == b"first and second"
        finally:
            stop.set()
            asker.join(timeout=10)
            busy.close()
            worker.close()


# How many: a bounded number of connections in all, any number of logged-in ones per address.


def test_connections_beyond_the_cap_are_closed_until_some_close(
    store: LocalStore, host_key: paramiko.PKey, caplog: pytest.LogCaptureFixture
) -> None:
    """With room for 3 connections, a 4th is closed at once (and logged); once one of the 3 goes,
    a new one is served."""
    with limited_server(store, host_key, max_connections=3) as server:
        held = [logged_in_from("127.0.0.1", server.port) for _ in range(3)]
        assert all(held)
        try:
            with caplog.at_level(logging.INFO, logger="pipeline"):
                turned_away = Knock(BYSTANDER, server.port)
                wait_for("the server to answer the 4th connection", turned_away.poll, timeout=30)
                assert turned_away.closed and not turned_away.greeted
                turned_away.sock.close()
            refusal = next(r for r in caplog.records if r.getMessage() == "sftp connection refused")
            assert refusal.reason == "too many connections" and refusal.peer == BYSTANDER  # type: ignore[attr-defined]
            held.pop().close()  # type: ignore[union-attr]
            held.append(
                wait_for("a new connection to be served", lambda: logged_in_from(BYSTANDER, server.port))
            )
        finally:
            for transport in held:
                if transport is not None:
                    transport.close()


def test_logged_in_connections_from_one_address_are_not_limited_per_address(
    store: LocalStore, host_key: paramiko.PKey
) -> None:
    """A fleet behind one NAT address: with 2 pending connections allowed per address, 20 workers
    at 127.0.0.1 are all logged in at once."""
    with limited_server(store, host_key, max_preauth_per_peer=2) as server:
        fleet = [logged_in_from("127.0.0.1", server.port) for _ in range(20)]
        try:
            assert all(fleet)
            assert server.connections == 20
        finally:
            for transport in fleet:
                if transport is not None:
                    transport.close()
