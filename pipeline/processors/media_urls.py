"""Media URLs: download the media of a page of YouTube, Vimeo or any site yt-dlp supports, and hand
it on to be transcribed.

A CPU worker runs yt-dlp on the URL: it finds the media (a site's own extractor,
or the generic one for a direct file, an HLS playlist or a page with a
``<video>``), checks the duration the site states against
``MORAG_MEDIA_MAX_DURATION_S`` and its stated size against
``MORAG_MAX_UPLOAD_MB`` before anything is downloaded, then downloads the best
audio (or the whole file where audio comes with the picture) with the subtitles
the site has. The download is bounded as it arrives by the same size and by
``MORAG_MEDIA_TIMEOUT_S``, and its duration is checked again once it is here.

Every request yt-dlp makes, redirects and HLS segments included, goes through
``pipeline.checking_proxy``, which refuses private, loopback and link-local
addresses as ``pipeline.netsafety`` does (``MORAG_FETCH_ALLOW_PRIVATE``,
``MORAG_FETCH_ALLOW_HOSTS``). HLS is fetched by yt-dlp's own downloader, never
by ffmpeg, so that nothing goes around the proxy.

The file is handed on (``HANDOFF``): the server makes it the task's input and
the task goes on as a transcription. The metadata (title, channel, duration,
page) and the subtitles travel in the stage's result under ``carry``; the server
adds what a stage carries to the task's final result. Every refusal names the
stage: ``media_url stage: <reason>``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.checking_proxy import CheckingProxy, checking_proxy
from pipeline.config import Settings
from pipeline.errors import BadInput, PipelineError, TaskCanceled
from pipeline.kinds import HANDOFF, MEDIA_URL, Outputs
from pipeline.logs import get_logger
from pipeline.processors import Progress, media, no_progress

logger = get_logger(__name__)

#: Sites whose URLs are media URLs (a host or any of its subdomains): the rest of the web is pages.
MEDIA_HOSTS = (
    "youtube.com",
    "youtu.be",
    "youtube-nocookie.com",
    "vimeo.com",
    "dailymotion.com",
    "dai.ly",
    "twitch.tv",
    "soundcloud.com",
    "bandcamp.com",
    "ted.com",
    "archive.org",
    "podbean.com",
    "mixcloud.com",
    "rumble.com",
    "bilibili.com",
)
#: Paths that are media whatever their host: HLS and DASH playlists.
MEDIA_PATHS = (".m3u8", ".mpd")
#: The subtitles kept, at most: languages, and characters in all (their text goes into the task's result).
MAX_SUBTITLE_LANGUAGES = 5
MAX_SUBTITLE_CHARS = 1_000_000
#: What the result keeps of yt-dlp's metadata.
METADATA = (
    "title", "channel", "uploader", "duration", "webpage_url", "extractor", "upload_date",
    "description", "language",
)  # fmt: skip


def is_media_url(url: str) -> bool:
    """Whether ``url`` is a media URL: a media site's (``MEDIA_HOSTS``) or an HLS/DASH playlist."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower().rstrip(".")
    if any(host == known or host.endswith("." + known) for known in MEDIA_HOSTS):
        return True
    return parts.path.lower().endswith(MEDIA_PATHS)


def failed(reason: str) -> BadInput:
    """A refusal of the media stage, named so in the task's error."""
    return BadInput(f"{MEDIA_URL.name} stage: {reason}")


def check_info(info: dict[str, Any], url: str, settings: Settings) -> None:
    """Refuse, before any download, what the metadata says is too much: a playlist, media longer
    than ``MORAG_MEDIA_MAX_DURATION_S``, a file larger than ``MORAG_MAX_UPLOAD_MB``."""
    if info.get("_type") in ("playlist", "multi_video"):
        count = len(list(info.get("entries") or []))
        raise failed(f"{url}: a playlist of {count} entries; submit the URL of each video")
    duration = info.get("duration")
    if isinstance(duration, int | float) and duration > settings.media_max_duration_s:
        raise failed(_too_long(url, duration, settings))
    size = info.get("filesize") or info.get("filesize_approx")
    if isinstance(size, int | float) and (too_large := MEDIA_URL.too_large(int(size), settings)):
        raise failed(f"{url}: {too_large}")


def _too_long(url: str, duration: float, settings: Settings) -> str:
    return (
        f"{url}: {duration:.0f}s of media, longer than the {settings.media_max_duration_s:g}s allowed"
        " (MORAG_MEDIA_MAX_DURATION_S)"
    )


def metadata(info: dict[str, Any]) -> dict[str, Any]:
    """What the result keeps of yt-dlp's metadata: title, channel, duration, page…"""
    found = {name: info.get(name) for name in METADATA if info.get(name) not in (None, "")}
    if "channel" not in found and "uploader" in found:
        found["channel"] = found["uploader"]
    return found


def subtitles(info: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The subtitles yt-dlp wrote, by language: their format and text. The media's own language
    and English come first; at most ``MAX_SUBTITLE_LANGUAGES`` languages and
    ``MAX_SUBTITLE_CHARS`` characters in all are kept (a talk may have fifty translations)."""
    requested = info.get("requested_subtitles") or {}
    first = [str(info.get("language") or ""), "en"]
    order = sorted(requested, key=lambda lang: (lang.split("-")[0] not in first, lang))
    found: dict[str, dict[str, str]] = {}
    room = MAX_SUBTITLE_CHARS
    for language in order[:MAX_SUBTITLE_LANGUAGES]:
        sub = requested[language]
        path = sub.get("filepath")
        text = sub.get("data")
        if text is None and path and Path(path).is_file():
            text = Path(path).read_text(encoding="utf-8", errors="replace")
        if text and room > 0:
            found[language] = {"format": sub.get("ext", ""), "text": text[:room]}
            room -= len(found[language]["text"])
    return found


class _Watch:
    """yt-dlp's progress hook: reports progress and stops a download past its size or time."""

    def __init__(
        self, url: str, settings: Settings, progress: Progress, should_stop: Callable[[], bool]
    ) -> None:
        self.url = url
        self.settings = settings
        self.progress = progress
        self.should_stop = should_stop
        self.deadline = time.monotonic() + settings.media_timeout_s
        self.stopped: PipelineError | None = None

    def check(self) -> None:
        if self.should_stop():
            self.stop(TaskCanceled("canceled while downloading"))
        if time.monotonic() > self.deadline:
            self.stop(
                failed(
                    f"{self.url}: not downloaded within {self.settings.media_timeout_s:g}s"
                    " (MORAG_MEDIA_TIMEOUT_S)"
                )
            )

    def stop(self, error: PipelineError) -> None:
        from yt_dlp.utils import DownloadCancelled

        self.stopped = error
        raise DownloadCancelled(str(error))

    def __call__(self, status: dict[str, Any]) -> None:
        done = status.get("downloaded_bytes") or 0
        total = status.get("total_bytes") or status.get("total_bytes_estimate")
        for size in (done, total):
            if size and (too_large := MEDIA_URL.too_large(int(size), self.settings)):
                self.stop(failed(f"{self.url}: {too_large}"))
        self.check()
        if status.get("status") == "finished":
            self.progress(MEDIA_URL.working, 100.0)
        elif total:
            self.progress(MEDIA_URL.working, min(99.0, 100.0 * done / total))
        elif status.get("fragment_count"):
            self.progress(
                MEDIA_URL.working,
                min(99.0, 100.0 * (status.get("fragment_index") or 0) / status["fragment_count"]),
            )


class _Log:
    """yt-dlp's messages, into the worker's structured log."""

    def __init__(self, url: str) -> None:
        self.extra = {"url": url}

    def debug(self, message: str) -> None:
        logger.debug(message, extra=self.extra)

    def info(self, message: str) -> None:
        logger.debug(message, extra=self.extra)

    def warning(self, message: str) -> None:
        logger.info(message, extra=self.extra)

    def error(self, message: str) -> None:
        logger.info(message, extra=self.extra)


def options(folder: Path, proxy: str, watch: _Watch, settings: Settings) -> dict[str, Any]:
    """yt-dlp's options: through ``proxy``, into ``folder``, the best audio, with subtitles."""
    return {
        "proxy": proxy,
        "format": "bestaudio/best",
        "outtmpl": {"default": "media.%(ext)s", "subtitle": "media.%(ext)s"},
        "paths": {"home": str(folder), "temp": str(folder)},
        "writesubtitles": True,
        "subtitleslangs": ["all"],
        "subtitlesformat": "vtt/srt/best",
        "noplaylist": True,
        "socket_timeout": min(settings.fetch_timeout_s, settings.media_timeout_s),
        "hls_prefer_native": True,  # yt-dlp fetches the segments, through the proxy; ffmpeg never does
        "external_downloader": {},
        "fixup": "never",
        "retries": 2,
        "fragment_retries": 2,
        "extractor_retries": 1,
        "cachedir": False,
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "progress_hooks": [watch],
        "logger": _Log(watch.url),
        "overwrites": True,
        "updatetime": False,
    }


def download(
    url: str,
    folder: Path,
    settings: Settings,
    progress: Progress = no_progress,
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[Path, dict[str, Any]]:
    """Download the media of ``url`` into ``folder``: the file and yt-dlp's metadata.

    BadInput (``media_url stage: …``) for what can never be downloaded; PipelineError for a site
    that is busy (HTTP 5xx, 429), retried.
    """
    try:
        import yt_dlp
        from yt_dlp.utils import DownloadCancelled, DownloadError
    except ImportError:  # a worker installed without the worker extra
        raise PipelineError(
            f"{MEDIA_URL.name} stage: yt-dlp is not installed on this worker (the worker extra)"
        ) from None

    watch = _Watch(url, settings, progress, should_stop)
    with checking_proxy(
        allow_private=settings.fetch_allow_private,
        allow_hosts=tuple(settings.fetch_allow_hosts),
        timeout_s=settings.fetch_timeout_s,
    ) as (proxy_url, proxy):
        try:
            with yt_dlp.YoutubeDL(options(folder, proxy_url, watch, settings)) as ydl:
                info = ydl.extract_info(url, download=False)
                check_info(info, url, settings)
                watch.check()
                progress(MEDIA_URL.working, 0.0)
                info = ydl.process_ie_result(info, download=True)
        except (DownloadError, DownloadCancelled) as exc:
            raise watch.stopped or _reason(url, exc, proxy) from None
    files = [Path(d["filepath"]) for d in info.get("requested_downloads") or [] if d.get("filepath")]
    path = next((f for f in files if f.is_file()), None)
    if path is None:
        raise failed(f"{url}: yt-dlp downloaded no file")
    if too_large := MEDIA_URL.too_large(path.stat().st_size, settings):
        raise failed(f"{url}: {too_large}")
    probed = media.probe(path)
    if probed is None:
        raise failed(f"{url}: the download is not audio or video that ffprobe can read")
    if probed.duration > settings.media_max_duration_s:
        raise failed(_too_long(url, probed.duration, settings))
    info.setdefault("duration", round(probed.duration, 3))
    return path, info


def _reason(url: str, exc: Exception, proxy: CheckingProxy) -> PipelineError:
    """The error of a failed download: what the proxy refused, else yt-dlp's own words."""
    if proxy.refusals:
        return failed(f"{url}: {proxy.refusals[-1]}")
    words = str(exc).removeprefix("ERROR: ").strip()
    if "Unsupported URL" in words:
        return failed(f"{url}: no media found there (yt-dlp: {words})")
    if any(f"HTTP Error {code}" in words for code in ("429", "500", "502", "503", "504")):
        return PipelineError(f"{MEDIA_URL.name} stage: {url}: {words}")  # the site's trouble: retried
    return failed(f"{url}: {words}")


def run(
    job: dict[str, Any],
    local: Path | None,
    folder: Path,
    settings: Settings,
    progress: Progress,
    should_stop: Callable[[], bool],
) -> tuple[Outputs, dict[str, Any]]:
    """The runner of media tasks: the media downloaded and handed on, its metadata and subtitles
    carried to the task's result."""
    url = job["input"]["url"]
    progress(MEDIA_URL.working, 0.0)
    started = time.perf_counter()
    path, info = download(url, folder, settings, progress, should_stop)
    source = {"url": url, **metadata(info)}
    subs = subtitles(info)
    summary = {
        "carry": {"source": {**source, "subtitles": subs}},
        "title": source.get("title"),
        "subtitles": sorted(subs),
        "timings": {"download_s": round(time.perf_counter() - started, 3)},
        "handed_on": path.suffix.lstrip("."),
    }
    return {HANDOFF: path}, summary
