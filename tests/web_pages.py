"""A local web site for the web-page and media-URL tests: an article, a page over the size limit,
a redirect loop, a 404, a redirect to ``localhost`` and a recording, served from 127.0.0.1; and
media for yt-dlp: a video, a page that embeds it with subtitles, HLS playlists (made with ffmpeg
from the samples, once per test session)."""

from __future__ import annotations

import functools
import http.server
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import SAMPLES

ARTICLE = b"""<!doctype html>
<html lang="en"><head><title>GPU farms for ingestion | Example News</title>
<meta name="author" content="Ada Lovelace">
<meta property="article:published_time" content="2024-03-05">
<meta property="og:site_name" content="Example News">
</head><body>
<nav><a href="/">Home</a> <a href="/about">About</a></nav>
<article>
<h1>GPU farms for ingestion</h1>
<p>Remote workers transcribe recordings on a shared pool of graphics cards. The queue decides
where each task runs, and a slow machine never blocks the others.</p>
<p>Read the <a href="/docs/routing.html">routing guide</a> for the cost model, and the
<a href="https://example.org/faq">FAQ</a> for the rest.</p>
<p>Every worker sends a heartbeat, and the server moves waiting work when a capability has no
live worker left. This keeps the pipeline moving through failures of single machines.</p>
</article>
<footer>Copyright 2024 Example News</footer>
</body></html>
"""
#: Two megabytes of page, sent in chunks (no Content-Length): over a limit of one.
BIG_PAGE = b"<html><body>" + b"<p>filler text of a page far too large</p>\n" * 48_000 + b"</body></html>"


#: A page that embeds a video with English subtitles, and nothing else to read.
WATCH_PAGE = b"""<!doctype html>
<html lang="en"><head><title>Remote GPU workers</title></head><body>
<video controls width="640">
<source src="/talks/talk.mp4" type="video/mp4">
<track kind="subtitles" src="/talks/talk.en.vtt" srclang="en" label="English">
</video>
</body></html>
"""
SUBTITLES = b"""WEBVTT

00:00:00.000 --> 00:00:04.000
Remote workers transcribe recordings.

00:00:04.000 --> 00:00:09.000
Each graphics card takes one task at a time.
"""
#: The media the site serves, made by ffmpeg from the samples: name -> content type.
MEDIA_TYPES = {".m3u8": "application/vnd.apple.mpegurl", ".ts": "video/mp2t", ".mp3": "audio/mpeg"}


@functools.cache
def media_folder() -> Path:
    """HLS playlists with their segments, made once: ``speech`` (9 s), ``long`` (the speech five
    times, 46 s), and ``big`` (30 s of noise at 320 kb/s, 1.2 MB); and ``big.mp3``."""
    folder = Path(tempfile.mkdtemp(prefix="media-site-"))
    ffmpeg = ["ffmpeg", "-v", "error", "-y"]
    big = folder / "big.mp3"
    subprocess.run(
        [*ffmpeg, "-f", "lavfi", "-i", "anoisesrc=d=30:a=0.3", "-b:a", "320k", str(big)], check=True
    )
    sources = {"speech": ["-i", str(SAMPLES / "speech.mp3")], "big": ["-i", str(big)]}
    sources["long"] = ["-stream_loop", "4", "-i", str(SAMPLES / "speech.mp3")]
    for name, source in sources.items():
        subprocess.run(
            [*ffmpeg, *source, "-c", "copy", "-f", "hls", "-hls_time", "2", "-hls_playlist_type", "vod",
             "-hls_segment_filename", str(folder / f"{name}%d.ts"), str(folder / f"{name}.m3u8")],
            check=True,
        )  # fmt: skip
    return folder


@dataclass
class Reply:
    """What the site answers to one path: a status, headers and a body."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    pause_s: float = 0.0  # between two chunks of a chunked body: a page that trickles in
    repeat: int = 1  # a chunked body sent this many times over, never held whole (a 1 GiB page)


def pages(path: str, base: str) -> Reply:
    """The site's pages; ``base`` is its own URL (``http://127.0.0.1:<port>``)."""
    html = {"Content-Type": "text/html; charset=utf-8"}
    port = base.rsplit(":", 1)[1]
    if path == "/news/gpu-farms.html":
        return Reply(body=ARTICLE, headers=html)
    if path == "/big.html":
        return Reply(body=BIG_PAGE, headers={**html, "Transfer-Encoding": "chunked"})
    if path == "/gigabyte.html":  # 1 GiB of page, streamed with no declared length
        piece = b"<p>" + b"x" * (64 * 1024 - 8) + b"</p>\n"
        return Reply(body=piece, headers={**html, "Transfer-Encoding": "chunked"}, repeat=16 * 1024)
    if path == "/loop":
        return Reply(302, headers={"Location": "/loop"})
    if path == "/to-localhost":
        return Reply(302, headers={"Location": f"http://localhost:{port}/news/gpu-farms.html"})
    if path == "/slow.html":  # 1 KB a second for 30 s
        return Reply(
            body=b"<p>" + b"slow " * 6000, headers={**html, "Transfer-Encoding": "chunked"}, pause_s=1.0
        )
    if path == "/busy":
        return Reply(503, b"<html><body>try again later</body></html>", html)
    if path == "/data.bin":
        return Reply(body=bytes(range(256)) * 64, headers={"Content-Type": "application/octet-stream"})
    if path == "/talks/speech.mp3":
        return Reply(body=(SAMPLES / "speech.mp3").read_bytes(), headers={"Content-Type": "audio/mpeg"})
    if path == "/talks/talk.mp4":
        return Reply(body=(SAMPLES / "talk.mp4").read_bytes(), headers={"Content-Type": "video/mp4"})
    if path == "/talks/slow.mp3":  # 1 KB a second: 37 s for the speech
        body = (SAMPLES / "speech.mp3").read_bytes()
        return Reply(
            body=body, headers={"Content-Type": "audio/mpeg", "Transfer-Encoding": "chunked"}, pause_s=1.0
        )
    if path == "/talks/talk.en.vtt":
        return Reply(body=SUBTITLES, headers={"Content-Type": "text/vtt"})
    if path == "/watch/talk.html":
        return Reply(body=WATCH_PAGE, headers=html)
    if path == "/hls/to-localhost.m3u8":
        return Reply(302, headers={"Location": f"http://localhost:{port}/hls/speech.m3u8"})
    if path.startswith("/hls/") and (file := media_folder() / path.removeprefix("/hls/")).is_file():
        return Reply(body=file.read_bytes(), headers={"Content-Type": MEDIA_TYPES[file.suffix]})
    return Reply(404, b"<html><body>no such page</body></html>", html)


@contextmanager
def local_site(answer: Callable[[str, str], Reply] = pages) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 answering each GET with ``answer(path, base URL)``; yields the
    base URL (``http://127.0.0.1:<port>``). A page served in chunks has no Content-Length."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
            reply = answer(self.path, base)
            self.send_response(reply.status)
            chunked = reply.headers.get("Transfer-Encoding") == "chunked"
            if not chunked:
                self.send_header("Content-Length", str(len(reply.body)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            try:
                if not chunked:
                    self.wfile.write(reply.body)
                    return
                size = 1024 if reply.pause_s else 65536
                for _ in range(reply.repeat):
                    for at in range(0, len(reply.body), size):
                        piece = reply.body[at : at + size]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        self.wfile.flush()
                        time.sleep(reply.pause_s)
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client stopped reading (a page over its limit)

        def log_message(self, *args: object) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: object, client_address: object) -> None:
            pass  # a client that hung up (a page over its limit) is not the site's fault

    server = Server(("127.0.0.1", 0), Handler)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield base
    finally:
        server.shutdown()
        server.server_close()
