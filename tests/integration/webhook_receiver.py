"""A webhook receiver for tests: a local HTTP server that keeps each POST and answers from a script."""

from __future__ import annotations

import http.server
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import wait_for


@dataclass
class Received:
    """One POST the receiver got, and the status it answered."""

    path: str
    headers: dict[str, str]
    body: bytes
    status: int


class Receiver:
    """Answers POSTs on 127.0.0.1: the statuses of ``answers`` first, then ``200``.

    Parameters:
      answers: the status of each first POST, in order (e.g. ``[500]``).
      port: the port to listen on (0: a free one); a receiver started again on its old
        port is the same address to the server.
      redirect_to: answer every POST with a ``302`` to this URL instead.
    """

    def __init__(self, answers: list[int] | None = None, port: int = 0, redirect_to: str | None = None):
        self.answers = list(answers or [])
        self.redirect_to = redirect_to
        self.received: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the standard library's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    status = receiver.answers.pop(0) if receiver.answers else 200
                    if receiver.redirect_to:
                        status = 302
                    receiver.received.append(Received(self.path, dict(self.headers), body, status))
                self.send_response(status)
                if receiver.redirect_to:
                    self.send_header("Location", receiver.redirect_to)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/morag"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def delivered(self) -> list[Received]:
        """The POSTs answered with a 2xx."""
        with self._lock:
            return [r for r in self.received if 200 <= r.status < 300]

    def wait(self, count: int, timeout: float = 60) -> list[Received]:
        """The 2xx-answered POSTs, once there are ``count``."""
        return wait_for(f"{count} webhook(s) delivered", lambda: len(self.delivered()) >= count and
                        self.delivered(), timeout=timeout)  # fmt: skip


def doc_snippet(path: Path, heading: str) -> str:
    """The first ```python block after ``heading`` in a Markdown file."""
    text = path.read_text()
    after = text[text.index(heading) :]
    found = re.search(r"```python\n(.*?)```", after, re.S)
    assert found, f"no python block after {heading!r} in {path}"
    return found.group(1)
