"""A local HTTP(S) forward proxy that refuses private addresses: for downloaders with their own
networking (yt-dlp).

``pipeline.netsafety`` checks the requests httpx sends. A library that opens its
own connections is pointed at this proxy instead (``127.0.0.1:<port>``, started
for one download and stopped after it): every request it makes, redirects and
HLS segments included, is a new request to the proxy, which resolves the target
host, refuses it when any of its addresses is private, loopback or link-local
(``netsafety.check_url``'s rule, lifted by ``MORAG_FETCH_ALLOW_PRIVATE`` or
``MORAG_FETCH_ALLOW_HOSTS``), and connects to an address it checked, so that a
second DNS answer cannot send the connection elsewhere.

It handles ``CONNECT host:port`` (HTTPS, tunnelled: the TLS is the client's own)
and ``GET``/``HEAD`` with an absolute URI (plain HTTP, relayed with
``Connection: close``). A refused or unreachable target is answered with 403 or
502, and its reason is kept in :attr:`CheckingProxy.refusals`, for the caller to
name in its error rather than the client's HTTP status.
"""

from __future__ import annotations

import http.server
import select
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from pipeline.logs import get_logger
from pipeline.netsafety import UnsafeURL, check_url, resolve

logger = get_logger(__name__)

#: Seconds a connection to a target may take to open, and a relay may stay silent.
CONNECT_TIMEOUT_S = 15.0
_HOP_HEADERS = frozenset({"connection", "proxy-connection", "keep-alive", "proxy-authorization", "te"})


class CheckingProxy:
    """The proxy's state: the rule it applies and what it refused.

    Parameters:
      allow_private: allow every private address (``MORAG_FETCH_ALLOW_PRIVATE``).
      allow_hosts: host names allowed whatever they resolve to (``MORAG_FETCH_ALLOW_HOSTS``).
      timeout_s: seconds a relayed connection may stay silent.
    """

    def __init__(self, allow_private: bool, allow_hosts: tuple[str, ...], timeout_s: float) -> None:
        self.allow_private = allow_private
        self.allow_hosts = allow_hosts
        self.timeout_s = timeout_s
        self.refusals: list[str] = []
        self.requests: list[str] = []
        self._lock = threading.Lock()

    def connect(self, scheme: str, host: str, port: int) -> socket.socket:
        """A connection to ``host:port`` when the rule allows it; UnsafeURL or OSError with the reason."""
        url = f"{scheme}://{host if ':' not in host else f'[{host}]'}:{port}/"
        with self._lock:
            self.requests.append(f"{host}:{port}")
        checked = check_url(url, allow_private=self.allow_private, allow_hosts=self.allow_hosts)
        last: OSError | None = None
        for address in checked or resolve(host, port):  # the addresses checked, not a second answer
            try:
                return socket.create_connection((address, port), timeout=CONNECT_TIMEOUT_S)
            except OSError as exc:
                last = exc
        raise OSError(f"cannot connect to {host}:{port}: {last}")

    def refused(self, reason: str) -> None:
        with self._lock:
            self.refusals.append(reason)
        logger.warning("proxy refused a request", extra={"reason": reason})


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_CONNECT(self) -> None:  # noqa: N802 (the standard library's name)
        host, _, port = self.path.rpartition(":")
        target = self._open("https", host.strip("[]"), int(port) if port.isdigit() else 443)
        if target is None:
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        self._relay(target)

    def do_GET(self) -> None:  # noqa: N802
        self._forward()

    def do_HEAD(self) -> None:  # noqa: N802
        self._forward()

    def _forward(self) -> None:
        parts = urlsplit(self.path)
        if parts.scheme != "http" or not parts.hostname:
            self._answer(400, f"{self.path!r}: only absolute http URLs and CONNECT are proxied")
            return
        target = self._open("http", parts.hostname, parts.port or 80)
        if target is None:
            return
        path = parts.path or "/"
        head = [f"{self.command} {path}{'?' + parts.query if parts.query else ''} HTTP/1.1"]
        head += [f"{k}: {v}" for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS]
        head.append("Connection: close")
        target.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        self.close_connection = True
        try:
            self.connection.sendall(_closing(target))
        except OSError:
            target.close()
            return
        self._relay(target)

    def _open(self, scheme: str, host: str, port: int) -> socket.socket | None:
        proxy = self.server.proxy
        try:
            return proxy.connect(scheme, host, port)
        except UnsafeURL as exc:
            proxy.refused(str(exc))
            self._answer(403, str(exc))
        except OSError as exc:
            proxy.refused(str(exc))
            self._answer(502, str(exc))
        return None

    def _answer(self, status: int, reason: str) -> None:
        body = reason.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _relay(self, target: socket.socket) -> None:
        """Copy bytes both ways until one side closes or stays silent past the timeout."""
        client = self.connection
        sockets = [client, target]
        try:
            while True:
                ready, _, _ = select.select(sockets, [], [], self.server.proxy.timeout_s)
                if not ready:
                    return
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (target if sock is client else client).sendall(data)
        except OSError:
            return
        finally:
            target.close()
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        logger.debug("proxy " + format % args)


def _closing(target: socket.socket) -> bytes:
    """The head of the target's answer (and what came with it), saying ``Connection: close``: the
    client opens a new connection for its next request (a redirect), checked anew."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = target.recv(65536)
        if not piece:
            raise OSError("the target closed the connection before its answer's head")
        data += piece
        if len(data) > 1024 * 1024:
            raise OSError("the target's answer has no end of head")
    head, _, rest = data.partition(b"\r\n\r\n")
    status, *fields = head.split(b"\r\n")
    kept = [f for f in fields if f.split(b":", 1)[0].strip().lower().decode("latin-1") not in _HOP_HEADERS]
    return b"\r\n".join([status, *kept, b"Connection: close"]) + b"\r\n\r\n" + rest


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    proxy: CheckingProxy

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hung up mid-relay


@contextmanager
def checking_proxy(
    *, allow_private: bool = False, allow_hosts: tuple[str, ...] = (), timeout_s: float = 30.0
) -> Iterator[tuple[str, CheckingProxy]]:
    """Run the proxy on ``127.0.0.1`` (a free port) while the block runs; yields its URL
    (``http://127.0.0.1:<port>``) and its state."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.proxy = CheckingProxy(allow_private, allow_hosts, timeout_s)
    thread = threading.Thread(target=server.serve_forever, name="checking-proxy", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.proxy
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
