"""What a file is, what processing it costs, and which queue it goes to.

The content decides, never the name alone: magic bytes, the parts of a ZIP
container, ffprobe. The name is a claim that is checked: a video renamed
``.txt`` is still transcribed; a text file named ``.mp4`` is refused, since
the user meant a video and this is not one.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pipeline.brokers import PRIORITIES
from pipeline.config import Settings, get_settings
from pipeline.errors import BadInput, UnsupportedType
from pipeline.kinds import CONVERT, IMAGE, KINDS, MEDIA_URL, TRANSCRIBE, WEB, Kind, kind_of
from pipeline.netsafety import check_url

MEDIA_EXTENSIONS = {
    ".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv",
    ".mp3", ".wav", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".wma", ".aiff",
}  # fmt: skip
DOCUMENT_EXTENSIONS = {".pdf", ".docx", ".pptx", ".xlsx", ".html", ".htm"}
MARKDOWN_EXTENSIONS = {".md", ".markdown", ".txt", ""}
GPU_PREFERENCES = ("require", "prefer", "never")
#: The longest URL a task may fetch.
MAX_URL_CHARS = 4096

_OFFICE_PARTS = {"word/document.xml": "docx", "ppt/presentation.xml": "pptx", "xl/workbook.xml": "xlsx"}


@dataclass
class Classification:
    """What the content of a file is and how big a job it makes."""

    kind: str  # the name of its kind (pipeline.kinds)
    format: str  # audio, video, pdf, docx, pptx, xlsx, html, md, png, jpeg, tiff, webp, url
    mime: str
    size: int
    duration: float | None = None
    pages: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def classify(path: Path, filename: str, settings: Settings | None = None) -> Classification:
    """Sniff a file's content; BadInput or UnsupportedType with the reason when refused.

    ``settings`` give the limits on ZIP containers (the process's settings by default).
    Reasons name the file on one line: control characters in ``filename`` are escaped.
    """
    suffix = Path(filename).suffix.lower()
    filename = shown_name(filename)
    size = path.stat().st_size
    if size == 0:
        raise BadInput(f"{filename}: the file is empty")
    with path.open("rb") as f:
        head = f.read(8192)

    # The processors are imported where a file is classified, not by every CLI command.
    from pipeline.processors import images, media
    from pipeline.processors.documents import count_pdf_pages_capped

    if head.startswith(b"%PDF-"):
        limits = settings or get_settings()
        try:
            pages = count_pdf_pages_capped(path, limits.document_max_memory_mb, limits.document_time_limit_s)
        except BadInput as exc:
            raise BadInput(f"{filename}: {exc}") from None
        if pages is None:
            raise BadInput(f"{filename}: the PDF is damaged and cannot be opened")
        return _claimed(Classification(CONVERT.name, "pdf", "application/pdf", size, pages=pages), suffix)
    if head.startswith(b"PK\x03\x04"):
        return _claimed(_office(path, filename, size, settings or get_settings()), suffix)
    if image := images.sniff(head):
        return _claimed(Classification(IMAGE.name, image, f"image/{image}", size), suffix)

    text = _as_text(head)
    if text is not None:
        return _text(text, filename, suffix, size)

    info = media.probe(path)
    if info is not None:
        if not info.has_audio:
            raise BadInput(f"{filename}: the video has no audio track to transcribe")
        found = Classification(
            TRANSCRIBE.name, info.kind, _mime(head, info.kind), size, duration=info.duration
        )
        return _claimed(found, suffix)

    guessed = _guess(head)
    if suffix in MEDIA_EXTENSIONS or (guessed and guessed.mime.split("/")[0] in ("audio", "video")):
        raise BadInput(f"{filename}: corrupt or truncated media: ffprobe cannot read it")
    detected = guessed.mime if guessed else "unknown binary data"
    raise UnsupportedType(
        f"{filename}: unsupported content ({detected}); expected audio, video, PDF, DOCX, "
        "PPTX, XLSX, HTML, Markdown or an image (PNG, JPEG, TIFF, WebP)"
    )


def classify_url(url: str, settings: Settings) -> Classification:
    """A URL to be fetched by a worker: UnsafeURL (BadInput) when it may not be fetched.

    The server fetches nothing: it checks the URL's scheme and, unless
    ``MORAG_FETCH_ALLOW_PRIVATE`` or ``MORAG_FETCH_ALLOW_HOSTS`` allow it, that its
    host resolves to public addresses only. The worker checks again at every hop.
    A URL of a media site (``media_urls.is_media_url``: YouTube, Vimeo…) or of an HLS
    playlist is a media URL, downloaded by yt-dlp; any other is a web page.
    """
    if len(url) > MAX_URL_CHARS or not url.isprintable():
        raise BadInput(f"a URL must be printable and at most {MAX_URL_CHARS} characters")
    from pipeline.processors import media_urls

    check_url(url, allow_private=settings.fetch_allow_private, allow_hosts=tuple(settings.fetch_allow_hosts))
    kind = MEDIA_URL if media_urls.is_media_url(url) else WEB
    return Classification(kind.name, "url", "text/uri-list", len(url.encode()))


def url_filename(url: str) -> str:
    """The name a URL's task goes by: the last part of its path, else its host."""
    parts = urlsplit(url)
    return unquote(parts.path.rstrip("/").rsplit("/", 1)[-1]) or parts.hostname or "page"


def shown_name(filename: str) -> str:
    """``filename`` as it may appear in a one-line message: non-printable characters escaped."""
    return filename if filename.isprintable() else repr(filename)[1:-1]


def kind_of_head(head: bytes) -> Kind:
    """A quick look at a file's first bytes: the kind it will most likely be (its upload limit)."""
    from pipeline.processors import images

    if images.sniff(head):
        return IMAGE
    if head.startswith((b"%PDF-", b"PK\x03\x04")) or _as_text(head) is not None:
        return CONVERT
    return TRANSCRIBE


def _as_text(head: bytes) -> str | None:
    if b"\x00" in head:
        return None
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut at the end of the sample is still text.
        if exc.start >= len(head) - 3:
            return head[: exc.start].decode("utf-8", errors="strict")
        return None


def _text(text: str, filename: str, suffix: str, size: int) -> Classification:
    start = text.lstrip("\ufeff \t\r\n").lower()
    if start.startswith(("<!doctype html", "<html")) or "<html" in start[:1024]:
        found = Classification(CONVERT.name, "html", "text/html", size)
        return _claimed(found, suffix)
    if suffix in MARKDOWN_EXTENSIONS:
        return Classification(CONVERT.name, "md", "text/markdown", size)
    raise UnsupportedType(
        f"{filename}: the content is plain text, but the name says {suffix} "
        f"({_claim(suffix)}); refusing rather than guessing"
    )


def _office(path: Path, filename: str, size: int, settings: Settings) -> Classification:
    names = zip_parts(
        path, filename, settings.max_zip_entries, settings.max_zip_uncompressed_mb * 1024 * 1024,
        wanted=set(_OFFICE_PARTS),
    )  # fmt: skip
    for part, fmt in _OFFICE_PARTS.items():
        if part in names:
            mime = f"application/vnd.openxmlformats-officedocument.{fmt}"
            return Classification(CONVERT.name, fmt, mime, size)
    raise UnsupportedType(f"{filename}: a ZIP archive, not a DOCX, PPTX or XLSX document")


_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_ENTRY = struct.Struct("<4s6H3L5H2L")  # central directory file header
_ZIP64_SIZE = 0xFFFFFFFF


def zip_parts(path: Path, filename: str, max_entries: int, max_bytes: int, wanted: set[str]) -> set[str]:
    """The names among ``wanted`` that a ZIP archive holds, read from its central directory.

    The archive is refused (BadInput) before anything is parsed when its
    end-of-central-directory record declares more than ``max_entries``
    entries, and while the directory is read, one header at a time, when it
    holds more entries than that or its entries' declared uncompressed sizes
    add up to more than ``max_bytes``. Memory stays small whatever the file:
    the directory is never loaded whole (Python's ``zipfile`` would build a
    list of every entry first).
    """
    damaged = BadInput(f"{filename}: damaged ZIP container")
    with path.open("rb") as f:
        end = f.seek(0, 2)
        tail_start = max(0, end - _EOCD.size - 0xFFFF)
        f.seek(tail_start)
        tail = f.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < _EOCD.size:
            raise damaged
        _, _, _, _, entries, cd_size, _, _ = _EOCD.unpack_from(tail, at)
        record_at = tail_start + at
        if at >= _EOCD64_LOCATOR.size and tail[at - _EOCD64_LOCATOR.size : at - 16] == b"PK\x06\x07":
            _, _, eocd64_at, _ = _EOCD64_LOCATOR.unpack_from(tail, at - _EOCD64_LOCATOR.size)
            if eocd64_at > end:
                raise damaged
            f.seek(eocd64_at)
            raw = f.read(_EOCD64.size)
            if len(raw) < _EOCD64.size or raw[:4] != b"PK\x06\x06":
                raise damaged
            *_, entries, cd_size, _ = _EOCD64.unpack(raw)
            record_at = eocd64_at
        if entries > max_entries:
            raise BadInput(f"{filename}: a ZIP of {entries} entries; at most {max_entries} are accepted")
        start = record_at - cd_size  # where the directory ends up when data was prepended, as zipfile
        if start < 0:
            raise damaged
        f.seek(start)
        found: set[str] = set()
        count = total = read = 0
        while read < cd_size:
            header = f.read(_ENTRY.size)
            if len(header) < _ENTRY.size or header[:4] != b"PK\x01\x02":
                raise damaged
            fields = _ENTRY.unpack(header)
            uncompressed, name_len, extra_len, comment_len = fields[9], fields[10], fields[11], fields[12]
            name = f.read(name_len)
            extra = f.read(extra_len)
            f.seek(comment_len, 1)
            read += _ENTRY.size + name_len + extra_len + comment_len
            if uncompressed == _ZIP64_SIZE:
                uncompressed = _zip64_size(extra)
                if uncompressed is None:
                    raise damaged
            count += 1
            total += uncompressed
            if count > max_entries:
                raise BadInput(f"{filename}: a ZIP of more than {max_entries} entries, the most accepted")
            if total > max_bytes:
                raise BadInput(
                    f"{filename}: a ZIP whose contents unpack to more than {max_bytes // (1024 * 1024)} MiB,"
                    " the most accepted"
                )
            decoded = name.decode("utf-8", errors="replace")
            if decoded in wanted:
                found.add(decoded)
    return found


def _zip64_size(extra: bytes) -> int | None:
    """The uncompressed size in a central directory entry's ZIP64 extra field, if there is one."""
    at = 0
    while at + 4 <= len(extra):
        tag, length = struct.unpack_from("<2H", extra, at)
        if tag == 0x0001 and length >= 8 and at + 12 <= len(extra):
            return int(struct.unpack_from("<Q", extra, at + 4)[0])
        at += 4 + length
    return None


def _claim(suffix: str) -> str:
    if suffix in MEDIA_EXTENSIONS:
        return "audio or video"
    if suffix in DOCUMENT_EXTENSIONS:
        return "a document"
    return "another type"


def _claimed(found: Classification, suffix: str) -> Classification:
    """Note where the name disagrees with the content; the content wins."""
    expected = {
        "audio": MEDIA_EXTENSIONS,
        "video": MEDIA_EXTENSIONS,
        "html": {".html", ".htm"},
        "pdf": {".pdf"},
        "jpeg": {".jpg", ".jpeg"},
        "tiff": {".tif", ".tiff"},
    }.get(found.format, {f".{found.format}"})
    if suffix not in expected:
        found.notes.append(
            f"the name says {suffix or 'nothing'} but the content is {found.format}; the content wins"
        )
    return found


def _mime(head: bytes, kind: str) -> str:
    guessed = _guess(head)
    return guessed.mime if guessed else f"{kind}/unknown"


def _guess(head: bytes) -> Any:
    """``filetype``'s guess at a file's type from its first bytes; None when it knows it not."""
    import filetype  # here, not at the top: only the server classifies, and a worker boots without it

    return filetype.guess(head)


@dataclass
class Route:
    """Where a task goes, at what priority, and why.

    ``fallback`` says why a task that prefers the GPU was sent to a CPU
    worker instead (None when it was not).
    """

    queue: str
    priority: str
    broker_priority: int
    gpu: str
    reasons: list[str]
    estimates: dict[str, float]
    time_limit_s: int
    fallback: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class QueueLoad:
    """What is known of one queue's workers when a task is routed.

    Parameters:
      workers: live workers consuming the queue.
      waiting: tasks ahead of a new one (waiting or running on the queue).
      realtime_factor: measured seconds of processing per second of media (None: not measured).
      task_s: measured seconds per task (None: not measured).
    """

    workers: int
    waiting: int = 0
    realtime_factor: float | None = None
    task_s: float | None = None


@dataclass(frozen=True)
class Capacity:
    """The workers the server knows of: live GPU workers and, where known, each queue's load."""

    gpu_workers: int | None = None
    gpu: QueueLoad | None = None
    cpu: QueueLoad | None = None


#: What a caller may know of the GPU workers: their count, their load too, or nothing.
WorkerView = Capacity | int | None


def as_capacity(view: WorkerView) -> Capacity:
    return view if isinstance(view, Capacity) else Capacity(gpu_workers=view)


def expected_finish(found: Classification, queue: str, load: QueueLoad, costs: dict[str, float]) -> float:
    """Seconds until a new task would be done on ``queue``: its wait behind others, then its own run.

    The wait is the tasks ahead, each taking the measured time per task
    (else this task's own estimate), shared among the live workers.
    """
    own = costs[f"{queue}_s"]
    if load.realtime_factor and found.duration:
        own = (2.0 if queue == "gpu" else 1.0) + found.duration * load.realtime_factor
    if load.workers <= 0:
        return float("inf")
    per_task = load.task_s or own
    return load.waiting * per_task / load.workers + own


def estimate(found: Classification, settings: Settings) -> dict[str, float]:
    """Expected processing seconds on each queue the task's kind may run on (its ``estimate``)."""
    return kind_of(found.kind).estimate(found, settings)


#: A task goes to a queue only when MORAG_MAX_TIME_LIMIT_S gives it at least this many
#: times its estimate there: an estimate is a guess, and a task cut off by its time limit
#: would only be retried to the same end.
HEADROOM = 2.0
#: The fix named when a task is too long for every queue it may use.
_RAISE_LIMIT = "or raise MORAG_MAX_TIME_LIMIT_S together with RabbitMQ's consumer_timeout (docs/failures.md)"


@dataclass(frozen=True)
class Fit:
    """Whether a task can finish on a queue within the time limits, and the limit it gets there.

    Parameters:
      queue: ``gpu`` or ``cpu``.
      time_limit_s: the task's time limit on that queue, never above MORAG_MAX_TIME_LIMIT_S.
      refused: why the task cannot run on that queue; None when it can.
    """

    queue: str
    time_limit_s: int
    refused: str | None = None

    @property
    def ok(self) -> bool:
        return self.refused is None


def fit(estimates: Mapping[str, float], queue: str, settings: Settings) -> Fit:
    """The time limit of a task on ``queue`` from its estimates, and whether it fits there.

    The limit is 60 s + 4 x the estimate, at least 120 s, capped by
    MORAG_MAX_TIME_LIMIT_S. On ``gpu`` it is sized from the slowest estimate:
    a GPU worker without a usable CUDA device runs Whisper on its CPU. The
    task fits the queue when the cap leaves it ``HEADROOM`` times its estimate
    there; so every task that is placed has at least twice its estimate.
    """
    cap = settings.max_time_limit_s
    own = estimates.get(f"{queue}_s")
    slowest = max(estimates.values()) if queue == "gpu" else (own or 0.0)
    limit = int(min(cap, max(120.0, 60.0 + 4 * slowest)))
    if own is None:
        return Fit(queue, limit, f"no {queue.upper()} worker runs this kind of task")
    if own * HEADROOM > cap:
        return Fit(
            queue,
            limit,
            f"it takes about {own:.0f}s on a {queue.upper()} worker, more than half of"
            f" MORAG_MAX_TIME_LIMIT_S={cap}s, the longest a task may run",
        )
    return Fit(queue, limit)


def fit_job(job: Mapping[str, Any], queue: str, settings: Settings) -> Fit:
    """``fit`` for a task message's job, from the media facts it carries (``job["media"]``).

    A job that carries no media facts (an older message) gets the cap and fits.
    """
    media = job.get("media")
    if not isinstance(media, Mapping) or media.get("kind") not in KINDS:
        return Fit(queue, settings.max_time_limit_s)
    known = {f.name for f in fields(Classification)}
    try:
        found = Classification(**{k: v for k, v in media.items() if k in known})
        return fit(estimate(found, settings), queue, settings)
    except (TypeError, ValueError):
        return Fit(queue, settings.max_time_limit_s)


def choose_route(
    found: Classification,
    settings: Settings,
    *,
    priority: str = "normal",
    gpu: str = "prefer",
    gpu_workers: int | None = None,
    capacity: Capacity | None = None,
) -> Route:
    """Pick the queue for a classified file.

    ``gpu_workers`` is the number of GPU workers believed live (None: unknown);
    ``capacity`` adds each queue's load. A transcription that prefers the GPU
    goes to ``cpu`` when no GPU worker is live, or when the GPU queue is busy
    and the expected completion on ``cpu`` comes sooner.

    Only a queue the task fits (``fit``) is chosen. A transcription too long
    for a CPU worker stays on ``gpu`` and waits for a GPU worker, even when
    none is live; a task too long for every queue it may use is refused with
    BadInput naming the reason and the fix. ``time_limit_s`` is the limit on
    the chosen queue.
    """
    capacity = capacity or Capacity()
    if gpu_workers is None:
        gpu_workers = capacity.gpu_workers
    if priority not in PRIORITIES:
        raise BadInput(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")
    if gpu not in GPU_PREFERENCES:
        raise BadInput(f"gpu must be one of {', '.join(GPU_PREFERENCES)}, not {gpu!r}")
    kind = kind_of(found.kind)
    costs = estimate(found, settings)
    on_cpu, on_gpu = fit(costs, "cpu", settings), fit(costs, "gpu", settings)
    reasons: list[str] = []
    fallback: str | None = None
    if not kind.prefers_gpu:
        queue = "cpu"
        _refuse_unless(on_cpu, f"split it into smaller {kind.accepts}, {_RAISE_LIMIT}")
        reasons.append(f"{found.format}: {kind.accepts} are handled by CPU workers")
    elif gpu == "never":
        queue = "cpu"
        _refuse_unless(on_cpu, f"let a GPU worker run it (--gpu prefer), split it, {_RAISE_LIMIT}")
        reasons.append("GPU not wanted for this task (--gpu never)")
    elif gpu == "require":
        queue = "gpu"
        _refuse_unless(on_gpu, f"split the recording, {_RAISE_LIMIT}")
        reasons.append("GPU required (--gpu require): waits for a GPU worker")
    elif not on_gpu.ok:
        queue = "cpu"
        if not on_cpu.ok:
            _refuse_unless(on_gpu, f"a CPU worker takes longer still; split the recording, {_RAISE_LIMIT}")
        reasons.append(f"too long for a GPU worker ({on_gpu.refused}): sent to CPU")
    elif gpu_workers == 0 and not on_cpu.ok:
        queue = "gpu"
        reasons.append(
            f"no GPU worker is connected, and the task is too long for a CPU worker ({on_cpu.refused}):"
            f" it waits for a GPU worker, at most MORAG_GPU_MAX_WAIT={settings.gpu_max_wait:g}s"
        )
    elif gpu_workers == 0:
        queue = "cpu"
        fallback = f"no GPU worker is connected: falling back to CPU (about {costs['cpu_s']:.0f}s)"
        reasons.append(fallback)
    elif on_cpu.ok and (busy := _busy_gpu(found, capacity, costs)) is not None:
        queue = "cpu"
        fallback = busy
        reasons.append(busy)
    else:
        queue = "gpu"
        live = "GPU worker count unknown" if gpu_workers is None else f"{gpu_workers} GPU worker(s) connected"
        what = f"{found.format} of {found.duration:.0f}s" if found.duration else found.format
        reasons.append(
            f"{what}: about {costs['gpu_s']:.0f}s on GPU against {costs['cpu_s']:.0f}s on CPU; {live}"
        )
    reasons.extend(found.notes)
    # The limit for the queue the task goes to; a reroute gives the copy the new queue's (fit_job).
    time_limit = (on_gpu if queue == "gpu" else on_cpu).time_limit_s
    return Route(
        queue=queue,
        priority=priority,
        broker_priority=PRIORITIES[priority],
        gpu=gpu,
        reasons=reasons,
        estimates=costs,
        time_limit_s=time_limit,
        fallback=fallback,
    )


def _refuse_unless(found: Fit, fix: str) -> None:
    """BadInput naming why the task cannot run on the queue it must use, and the fix."""
    if not found.ok:
        raise BadInput(f"too long to process: {found.refused}; {fix}")


def _busy_gpu(found: Classification, capacity: Capacity, costs: dict[str, float]) -> str | None:
    """Why the task should go to ``cpu`` by load, or None when the GPU is the better bet.

    Only a GPU queue with tasks ahead of this one is weighed: an idle GPU
    worker always takes a transcription that prefers it.
    """
    gpu, cpu = capacity.gpu, capacity.cpu
    if gpu is None or cpu is None or gpu.workers <= 0 or cpu.workers <= 0 or gpu.waiting < gpu.workers:
        return None
    on_gpu = expected_finish(found, "gpu", gpu, costs)
    on_cpu = expected_finish(found, "cpu", cpu, costs)
    if on_cpu >= on_gpu:
        return None
    return (
        f"GPU queue busy ({gpu.waiting} task(s) for {gpu.workers} GPU worker(s)): done in about "
        f"{on_cpu:.0f}s on CPU ({cpu.workers} worker(s), {cpu.waiting} ahead) against {on_gpu:.0f}s on GPU"
    )
