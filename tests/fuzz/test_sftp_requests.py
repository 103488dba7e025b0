"""Fuzzes the embedded SFTP server's request handling with raw, hostile SFTP packets.

A logged-in client opens an ``sftp`` channel, says hello, then sends framed
packets (uint32 length, type byte, payload) of random types and payloads:
requests with random paths (traversal, NUL, huge), random handles, random
flags and sizes, the grant extensions with random tokens, and plain garbage.
The server answers or closes that channel; it never falls over: after each
example a fresh session still lists the store, and no file appears outside
the store's folder.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.transfer.sftp_server import (
    GRANT_EXTENSION,
    GRANT_RELEASE_EXTENSION,
    SftpServer,
    WorkerCredentials,
    load_host_key,
)
from tests.fuzz.conftest import examples

pytestmark = [pytest.mark.fuzz, pytest.mark.slow]

USER, PASSWORD = "worker", "fuzz-password-not-secret"
#: How long the client waits for the server's answer to one packet.
ANSWER_S = 1.0

paths = st.one_of(
    st.text(max_size=60),
    st.sampled_from(
        ["/", ".", "..", "../..", "/../../outside", "../outside/x", "/tasks/../../outside/y", "a\x00b",
         "/etc/passwd", "x" * 70_000, "/tasks/t1/output/new", "tasks", "//", "\\..\\outside"]
    ),
)  # fmt: skip
handles = st.binary(max_size=300) | st.sampled_from([b"", b"0", b"1", b"\x00" * 4, b"-1"])
# A field of a request: a string (path, handle, name, data) or a number (flags, offset, length).
fields = st.one_of(
    paths.map(lambda p: ("s", p.encode("utf-8", "surrogatepass"))),
    handles.map(lambda h: ("s", h)),
    st.integers(0, 2**32 - 1).map(lambda n: ("u", n)),
    st.integers(0, 2**64 - 1).map(lambda n: ("q", n)),
    st.sampled_from([("u", 0), ("u", 2**31), ("q", 2**63), ("u", 0xFFFFFFFF)]),
)
# SFTP v3 request types, the extended request, and any other byte.
types = st.sampled_from([3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 200]) | st.integers(
    0, 255
)


def encode(kind: str, value: int | bytes) -> bytes:
    if kind == "u":
        return struct.pack(">I", value)
    if kind == "q":
        return struct.pack(">Q", value)
    assert isinstance(value, bytes)
    return struct.pack(">I", len(value)) + value


@st.composite
def packets(draw: st.DrawFn) -> bytes:
    """One framed SFTP packet: well framed with random fields, an extension, or broken framing."""
    kind = draw(st.sampled_from(["fields", "fields", "extension", "garbage", "bad length"]))
    if kind == "extension":
        known = [GRANT_EXTENSION, GRANT_RELEASE_EXTENSION, "check-file", "posix-rename@openssh.com"]
        name = draw(st.sampled_from(known) | st.text(max_size=30))
        body = bytes([200]) + encode("u", draw(st.integers(0, 2**32 - 1))) + encode("s", name.encode())
        body += b"".join(encode(*f) for f in draw(st.lists(fields, max_size=3)))
    elif kind == "fields":
        body = bytes([draw(types)]) + encode("u", draw(st.integers(0, 2**32 - 1)))
        body += b"".join(encode(*f) for f in draw(st.lists(fields, max_size=5)))
    else:
        body = bytes([draw(types)]) + draw(st.binary(max_size=200))
    if kind == "bad length":
        return struct.pack(">I", draw(st.sampled_from([0, 1, len(body) + 7, 2**31, 2**32 - 1]))) + body
    return struct.pack(">I", len(body)) + body


class Client:
    """One SSH connection to the server; each example opens its own ``sftp`` channel on it."""

    def __init__(self, port: int) -> None:
        self.transport = paramiko.Transport(socket.create_connection(("127.0.0.1", port), timeout=10))
        self.transport.start_client(timeout=10)
        self.transport.auth_password(USER, PASSWORD)

    def raw_channel(self) -> paramiko.Channel:
        channel = self.transport.open_session(timeout=10)
        channel.invoke_subsystem("sftp")
        channel.settimeout(ANSWER_S)
        init = bytes([1]) + encode("u", 3)
        channel.sendall(struct.pack(">I", len(init)) + init)
        assert read_packet(channel)[0] == 2  # SSH_FXP_VERSION
        return channel

    def lists_store(self) -> list[str]:
        with paramiko.SFTPClient.from_transport(self.transport) as sftp:  # a fresh, well-formed session
            assert sftp is not None
            return sftp.listdir("/")


def read_packet(channel: paramiko.Channel) -> bytes:
    """One packet's type and payload; EOFError when the server closed the channel."""
    head = _read(channel, 4)
    return _read(channel, struct.unpack(">I", head)[0])


def _read(channel: paramiko.Channel, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = channel.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SftpServer, Client, Path, Path]]:
    base = tmp_path_factory.mktemp("sftp-fuzz")
    root, outside = base / "store", base / "outside"
    (root / "tasks" / "t1" / "input").mkdir(parents=True)
    (root / "tasks" / "t1" / "input" / "a.txt").write_bytes(b"input")
    outside.mkdir()
    (outside / "sentinel").write_bytes(b"must stay alone")
    key = load_host_key(tmp_path_factory.mktemp("hostkey") / "sftp_host_ed25519_key")
    with SftpServer(root, key, WorkerCredentials(USER, PASSWORD), "127.0.0.1", 0) as server:
        client = Client(server.port)
        yield server, client, root, outside
        client.transport.close()


def outside_files(base: Path, root: Path) -> list[Path]:
    return sorted(p for p in base.rglob("*") if root not in p.parents and p != root)


@settings(max_examples=examples(50), deadline=None)
@given(st.lists(packets(), min_size=1, max_size=4))
def test_hostile_packets_never_break_the_server(
    served: tuple[SftpServer, Client, Path, Path], sent: list[bytes]
) -> None:
    server, client, root, outside = served
    before = outside_files(root.parent, root)
    channel = client.raw_channel()
    try:
        for packet in sent:
            try:
                channel.sendall(packet)
            except OSError:  # the server closed the channel: an answer too
                break
        # Drain what the server answers (a status, data, or nothing once the framing is broken).
        for _ in sent:
            try:
                read_packet(channel)
            except (EOFError, OSError, TimeoutError):
                break
    finally:
        channel.close()
    assert "tasks" in client.lists_store()
    assert outside_files(root.parent, root) == before
    assert (outside / "sentinel").read_bytes() == b"must stay alone"


def test_a_fresh_connection_logs_in_after_the_fuzzing(served: tuple[SftpServer, Client, Path, Path]) -> None:
    server, *_ = served
    client = Client(server.port)
    try:
        assert "tasks" in client.lists_store()
    finally:
        client.transport.close()


@pytest.mark.parametrize(
    ("request_type", "before"),
    [
        (14, [("s", b"/tasks/t1/output/x")]),
        (3, [("s", b"/tasks/t1/output/y"), ("u", 0x1A)]),
        (9, [("s", b"/")]),
    ],
    ids=["mkdir", "open", "setstat"],
)
def test_a_request_declaring_billions_of_attributes_is_refused_at_once(
    served: tuple[SftpServer, Client, Path, Path], request_type: int, before: list[tuple[str, bytes | int]]
) -> None:
    """Found by a long run: a request whose ATTRS block declares 2^32 - 1 extended attributes in a
    few bytes kept a server thread reading zero padding for hours. It is answered with
    SSH_FX_BAD_MESSAGE straight away, and the session goes on."""
    _, client, root, _ = served
    channel = client.raw_channel()
    channel.settimeout(30)  # unanswered for hours before; answered at once now
    try:
        attrs = encode("u", 0x80000000) + encode("u", 0xFFFFFFFF)  # FLAG_EXTENDED, count
        body = bytes([request_type]) + encode("u", 7) + b"".join(encode(*f) for f in before) + attrs
        channel.sendall(struct.pack(">I", len(body)) + body)
        answer = read_packet(channel)
        assert answer[0] == 101  # SSH_FXP_STATUS
        request_id, code = struct.unpack(">II", answer[1:9])
        assert (request_id, code) == (7, 5)  # SSH_FX_BAD_MESSAGE
        # The same session answers the next request.
        body = bytes([17]) + encode("u", 8) + encode("s", b"/")  # SSH_FXP_STAT
        channel.sendall(struct.pack(">I", len(body)) + body)
        assert read_packet(channel)[:5] == bytes([105]) + struct.pack(">I", 8)  # SSH_FXP_ATTRS
    finally:
        channel.close()
    assert not (root / "tasks" / "t1" / "output").exists()
