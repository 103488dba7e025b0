"""A local HTTP proxy for client tests: answers the first requests with the statuses it is given,
then passes every request through to the server, and counts what it saw."""

from __future__ import annotations

import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding"}


class AnsweringProxy:
    """Serves on 127.0.0.1 (``url``); ``refusals`` are answered first, in order, as (status, headers).

    ``seen`` counts (method, path) of every request; ``refused`` those answered from ``refusals``.
    """

    def __init__(self, upstream: str, refusals: list[tuple[int, dict[str, str]]] | None = None) -> None:
        self.upstream = upstream
        self.refusals = list(refusals or [])
        self.seen: Counter[tuple[str, str]] = Counter()
        self.refused: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy.handle(self)

            do_POST = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("content-length") or 0)
        body = request.rfile.read(length) if length else b""
        path = request.path.split("?")[0]
        with self.lock:
            self.seen[(request.command, path)] += 1
            refusal = self.refusals.pop(0) if self.refusals else None
            if refusal:
                self.refused.append((request.command, path, refusal[0]))
        if refusal:
            request.send_response(refusal[0])
            for name, value in {**refusal[1], "Content-Type": "application/json"}.items():
                request.send_header(name, value)
            payload = b'{"detail": "try again"}'
            request.send_header("Content-Length", str(len(payload)))
            request.end_headers()
            request.wfile.write(payload)
            return
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        with httpx.stream(request.command, f"{self.upstream}{request.path}", content=body, headers=headers,
                          timeout=httpx.Timeout(30, read=None)) as answer:  # fmt: skip
            request.send_response(answer.status_code)
            for name, value in answer.headers.items():
                if name.lower() not in HOP:
                    request.send_header(name, value)
            request.send_header("Transfer-Encoding", "chunked")
            request.end_headers()
            try:
                for chunk in answer.iter_raw():
                    request.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    request.wfile.flush()
                request.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
