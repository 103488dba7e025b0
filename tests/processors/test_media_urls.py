"""Media URLs downloaded by yt-dlp on a worker, through the proxy that refuses private addresses:
a direct video, an HLS playlist and a page with a ``<video>`` come down with their metadata and
subtitles; each bad URL fails naming the stage, with its reason. Which URLs are media URLs: the
media sites' (YouTube, Vimeo…) and HLS playlists.

No test reaches YouTube itself (the tests run offline): its URLs' classification is checked
here, and the download path is yt-dlp's generic extractor on a local site, which runs the same
code of ours (proxy, bounds, metadata, subtitles, hand-off)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.checking_proxy import checking_proxy
from pipeline.config import Settings
from pipeline.errors import BadInput
from pipeline.kinds import HANDOFF, MEDIA_URL, WEB
from pipeline.processors import media, media_urls, no_progress, web
from pipeline.routing import classify_url
from tests.conftest import free_port
from tests.web_pages import SUBTITLES, local_site

#: 127.0.0.1 allowed by name; ``localhost`` (where /hls/to-localhost.m3u8 leads) is not.
SETTINGS = Settings(
    fetch_allow_hosts=["127.0.0.1"], fetch_timeout_s=10, max_upload_mb=1, media_max_duration_s=40
)


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    with local_site() as base:
        yield base


def run(url: str, folder: Path, settings: Settings = SETTINGS) -> tuple[dict, dict]:
    job = {"task_id": "t1", "kind": MEDIA_URL.name, "filename": "x", "input": {"url": url}, "media": {}}
    return media_urls.run(job, None, folder, settings, no_progress, lambda: False)


@pytest.mark.parametrize(
    ("path", "seconds", "title"), [("talks/talk.mp4", 13.2, "talk"), ("hls/speech.m3u8", 9.2, "speech")]
)
def test_a_direct_video_and_an_hls_playlist_come_down_with_their_metadata(
    site: str, tmp_path: Path, path: str, seconds: float, title: str
) -> None:
    progress: list[tuple[str, float]] = []
    job = {"task_id": "t1", "kind": MEDIA_URL.name, "filename": "x", "input": {"url": f"{site}/{path}"}}
    outputs, summary = media_urls.run(
        job, None, tmp_path, SETTINGS, lambda stage, pct: progress.append((stage, pct)), lambda: False
    )
    assert set(outputs) == {HANDOFF}
    probed = media.probe(outputs[HANDOFF])
    assert probed is not None and probed.has_audio and abs(probed.duration - seconds) < 0.6
    source = summary["carry"]["source"]
    assert (source["title"], source["webpage_url"], source["extractor"]) == (
        title,
        f"{site}/{path}",
        "generic",
    )
    assert abs(source["duration"] - seconds) < 0.6
    assert progress[0] == (MEDIA_URL.working, 0.0) and progress[-1] == (MEDIA_URL.working, 100.0)


def test_a_page_with_a_video_comes_down_with_its_subtitles(site: str, tmp_path: Path) -> None:
    outputs, summary = run(f"{site}/watch/talk.html", tmp_path)
    assert media.probe(outputs[HANDOFF]) is not None
    source = summary["carry"]["source"]
    assert source["title"].startswith("Remote GPU workers") and source["extractor"] == "html5"
    assert source["subtitles"] == {"en": {"format": "vtt", "text": SUBTITLES.decode()}}
    assert summary["subtitles"] == ["en"]


def test_a_page_with_no_article_that_embeds_media_goes_on_as_a_media_url(site: str, tmp_path: Path) -> None:
    job = {"task_id": "t1", "kind": WEB.name, "filename": "x", "input": {"url": f"{site}/watch/talk.html"}}
    outputs, summary = web.run(job, None, tmp_path, SETTINGS, no_progress, lambda: False)
    assert outputs == {} and summary["goes_on_as"] == MEDIA_URL.name
    assert summary["reason"] == "the page has no article but embeds media"


def test_a_sites_metadata_and_subtitles_are_what_the_result_keeps() -> None:
    info = {  # what yt-dlp's YouTube extractor says of a video, in part
        "id": "dQw4w9WgXcQ", "title": "A talk", "channel": "Example Channel", "uploader": "Example",
        "duration": 212, "webpage_url": "https://www.youtube.com/watch?v=dQw4w9WgXcQ",
        "extractor": "youtube", "upload_date": "20240305", "view_count": 12,
        "requested_subtitles": {"en": {"ext": "vtt", "data": "WEBVTT\n\n00:00.000 --> 00:01.000\nHi\n"}},
    }  # fmt: skip
    assert media_urls.metadata(info) == {
        "title": "A talk", "channel": "Example Channel", "uploader": "Example", "duration": 212,
        "webpage_url": "https://www.youtube.com/watch?v=dQw4w9WgXcQ", "extractor": "youtube",
        "upload_date": "20240305",
    }  # fmt: skip
    assert media_urls.subtitles(info) == {
        "en": {"format": "vtt", "text": "WEBVTT\n\n00:00.000 --> 00:01.000\nHi\n"}
    }
    assert media_urls.metadata({"title": "x", "uploader": "Someone"})["channel"] == "Someone"
    # A talk with fifty translations: its own language and English first, five languages at most.
    many = {f"x{n:02d}": {"ext": "vtt", "data": "WEBVTT\n"} for n in range(50)}
    many |= {"en": {"ext": "vtt", "data": "WEBVTT\n"}, "de-DE": {"ext": "vtt", "data": "WEBVTT\n"}}
    kept = media_urls.subtitles({"language": "de", "requested_subtitles": many})
    assert list(kept) == ["de-DE", "en", "x00", "x01", "x02"]
    huge = {lang: {"ext": "vtt", "data": "a" * 600_000} for lang in ("en", "fr")}
    texts = [s["text"] for s in media_urls.subtitles({"requested_subtitles": huge}).values()]
    assert sum(map(len, texts)) == media_urls.MAX_SUBTITLE_CHARS


def test_what_the_metadata_says_is_too_much_is_refused_before_any_download() -> None:
    url = "https://www.youtube.com/watch?v=x"
    media_urls.check_info({"duration": 40, "filesize": 1024 * 1024}, url, SETTINGS)  # at the limits
    with pytest.raises(BadInput, match=r"^media_url stage: .*: 18000s of media, longer than the 40s allowed"):
        media_urls.check_info({"duration": 5 * 3600}, url, SETTINGS)
    with pytest.raises(
        BadInput, match=r"larger than the 1 MiB allowed for media URLs \(MORAG_MAX_UPLOAD_MB\)"
    ):
        media_urls.check_info({"filesize_approx": 5 * 1024 * 1024}, url, SETTINGS)
    with pytest.raises(BadInput, match="a playlist of 2 entries; submit the URL of each video"):
        media_urls.check_info({"_type": "playlist", "entries": [{}, {}]}, url, SETTINGS)


def _bad(site: str) -> list[tuple[str, str]]:
    return [
        (f"{site}/hls/missing.m3u8", "HTTP Error 404: Not Found"),
        (f"http://127.0.0.1:{free_port()}/gone.m3u8", "cannot connect to 127.0.0.1"),
        (f"{site}/news/gpu-farms.html", "no media found there (yt-dlp: Unsupported URL"),
        (f"{site}/hls/to-localhost.m3u8", "localhost resolves to a private address (127.0.0.1): refused"),
        (f"{site}/hls/big.m3u8", "larger than the 1 MiB allowed for media URLs (MORAG_MAX_UPLOAD_MB)"),
        (f"{site}/hls/long.m3u8", "45s of media, longer than the 40s allowed (MORAG_MEDIA_MAX_DURATION_S)"),
    ]


def test_each_bad_media_url_fails_naming_the_stage_and_its_reason(site: str, tmp_path: Path) -> None:
    for number, (url, reason) in enumerate(_bad(site)):
        folder = tmp_path / str(number)
        folder.mkdir()
        with pytest.raises(BadInput) as caught:
            run(url, folder)
        assert str(caught.value).startswith(f"media_url stage: {url}: "), str(caught.value)
        assert reason in str(caught.value), str(caught.value)
        if url.endswith("long.m3u8"):  # the playlist states its duration: refused before the download
            assert list(folder.iterdir()) == []
    # A download that trickles in is stopped at its time limit.
    with pytest.raises(BadInput, match=r"slow.mp3: not downloaded within 3s \(MORAG_MEDIA_TIMEOUT_S\)"):
        run(f"{site}/talks/slow.mp3", tmp_path, SETTINGS.model_copy(update={"media_timeout_s": 3}))
    # A direct file states no duration: it is measured once downloaded.
    with pytest.raises(BadInput, match=r"talk.mp4: 13s of media, longer than the 10s allowed"):
        run(f"{site}/talks/talk.mp4", tmp_path, SETTINGS.model_copy(update={"media_max_duration_s": 10}))


def test_the_media_sites_and_hls_playlists_are_media_urls() -> None:
    media_sites = [
        "https://www.youtube.com/watch?v=dQw4w9WgXcQ", "https://youtu.be/dQw4w9WgXcQ",
        "https://m.youtube.com/shorts/abc", "https://vimeo.com/76979871",
        "https://cdn.example.org/live/stream.m3u8",
    ]  # fmt: skip
    pages = [
        "https://example.org/news/article.html",
        "https://notyoutube.com/watch?v=x",
        "https://example.org/a.mp4",
    ]
    assert [media_urls.is_media_url(url) for url in media_sites] == [True] * len(media_sites)
    assert [media_urls.is_media_url(url) for url in pages] == [False] * len(pages)
    # Allowed by name, the hosts are not looked up: this runs offline.
    hosts = ["www.youtube.com", "youtu.be", "m.youtube.com", "vimeo.com", "cdn.example.org", "example.org"]
    settings = Settings(fetch_allow_hosts=hosts)
    assert {classify_url(url, settings).kind for url in media_sites} == {MEDIA_URL.name}
    assert classify_url(pages[0], settings).kind == WEB.name


def _ask(proxy: str, request: bytes) -> bytes:
    host, port = proxy.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
            if request.startswith(b"CONNECT") and b"\r\n\r\n" in answer:
                conn.sendall(b"GET /news/gpu-farms.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                request = b""
    return answer


def test_the_proxy_refuses_private_addresses_and_relays_the_rest(site: str) -> None:
    port = site.rsplit(":", 1)[1]
    with checking_proxy(allow_hosts=("127.0.0.1",)) as (proxy, state):
        page = _ask(proxy, f"GET {site}/news/gpu-farms.html HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert page.startswith(b"HTTP/1.1 200") and b"Connection: close" in page and b"GPU farms" in page
        tunnel = _ask(proxy, f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        assert tunnel.startswith(b"HTTP/1.1 200 Connection established") and b"GPU farms" in tunnel
        for request in (
            f"GET http://localhost:{port}/ HTTP/1.1\r\n\r\n",
            f"CONNECT 10.0.0.1:{port} HTTP/1.1\r\n\r\n",
        ):
            answer = _ask(proxy, request.encode())
            assert answer.startswith(b"HTTP/1.1 403") and b"resolves to a private address" in answer
        assert len(state.refusals) == 2 and "MORAG_FETCH_ALLOW_PRIVATE=true" in state.refusals[0]
    with checking_proxy(allow_private=True) as (proxy, state):
        answer = _ask(proxy, f"GET http://localhost:{port}/news/gpu-farms.html HTTP/1.1\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 200") and state.refusals == []


def test_the_proxy_connects_to_the_address_it_checked_not_to_a_second_dns_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DNS rebinding: the host answers a public address when checked, then 127.0.0.1. The proxy
    connects to the address it checked (unreachable here), never to the listener on 127.0.0.1."""
    from pipeline import checking_proxy as proxy_module
    from pipeline import netsafety

    answers = iter([["1.1.1.1"], ["127.0.0.1"]])
    monkeypatch.setattr(netsafety, "resolve", lambda host, port: next(answers))
    monkeypatch.setattr(proxy_module, "resolve", lambda host, port: next(answers))
    monkeypatch.setattr(proxy_module, "CONNECT_TIMEOUT_S", 1.0)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        state = proxy_module.CheckingProxy(allow_private=False, allow_hosts=(), timeout_s=5)
        with pytest.raises(OSError, match="cannot connect to rebinding.example"):
            state.connect("http", "rebinding.example", listener.getsockname()[1]).close()
        with pytest.raises(TimeoutError):
            listener.accept()
    assert next(answers) == ["127.0.0.1"]  # asked once
