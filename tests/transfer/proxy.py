"""A TCP proxy for tests that cuts connections after a number of bytes, as a flaky network would."""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass

UP, DOWN = "up", "down"  # client to server, server to client


@dataclass
class _Link:
    client: socket.socket
    server: socket.socket
    limit: int | None
    moved: int = 0
    cut: bool = False


class CuttingProxy:
    """Forwards connections on ``port`` to ``target_port``; cuts the first ``cuts`` of them.

    A cut connection is closed, both ways, once ``limit`` bytes went through
    it in ``direction``. ``moved`` counts bytes forwarded each way, over all
    connections; ``connections`` counts connections accepted; ``cut_count``
    connections actually cut. ``cut_now`` cuts every open connection at once.

    Parameters:
      target_port: the server's port on 127.0.0.1.
      direction: ``up`` (client to server) or ``down``.
      limit: bytes after which a connection is cut; None forwards everything.
      cuts: how many connections, the first ones, are cut.
      listen_host: where the proxy listens (another host's view of this one, in a network
        namespace a test made).
    """

    def __init__(
        self,
        target_port: int,
        direction: str = DOWN,
        limit: int | None = None,
        cuts: int = 0,
        listen_host: str = "127.0.0.1",
    ) -> None:
        self.target_port = target_port
        self.direction = direction
        self.limit = limit
        self.cuts = cuts
        self.connections = 0
        self.cut_count = 0
        self.moved = {UP: 0, DOWN: 0}
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self._listener = socket.create_server((listen_host, 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        """Stop listening and close every connection."""
        self._closed = True
        self._listener.close()
        with self._lock:
            links = list(self._links)
        for link in links:
            for sock in (link.client, link.server):
                with contextlib.suppress(OSError):
                    sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # the target is away (restarting): refused, as a direct connection would be
                client.close()
                continue
            with self._lock:
                self.connections += 1
                limit = self.limit if self.connections <= self.cuts else None
            link = _Link(client, server, limit)
            with self._lock:
                self._links.append(link)
            threading.Thread(target=self._pump, args=(link, client, server, UP), daemon=True).start()
            threading.Thread(target=self._pump, args=(link, server, client, DOWN), daemon=True).start()

    def cut_now(self) -> int:
        """Cut every connection still open, both ways, as a network outage would; returns how many."""
        with self._lock:
            links, self._links = self._links, []
        cut = 0
        for link in links:
            if link.cut:
                continue
            self._cut(link)
            cut += 1
            for sock in (link.client, link.server):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        return cut

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while data := src.recv(65536):
                if direction == self.direction and link.limit is not None:
                    room = link.limit - link.moved
                    if len(data) >= room:
                        dst.sendall(data[:room])
                        self._count(direction, room)
                        self._cut(link)
                        return
                    link.moved += len(data)
                dst.sendall(data)
                self._count(direction, len(data))
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _count(self, direction: str, size: int) -> None:
        with self._lock:
            self.moved[direction] += size

    def _cut(self, link: _Link) -> None:
        with self._lock:
            if not link.cut:
                link.cut = True
                self.cut_count += 1
