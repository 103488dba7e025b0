"""Media probing (ffprobe) and audio extraction (ffmpeg), each bounded in time.

Every external process runs through ``run_bounded``: it is killed when it
outlives its timeout, and the wait returns to Python every second, so
Dramatiq's time limit and shutdown reach a worker thread waiting on it (the
process is killed then too). A probe gets a fixed bound, an extraction one
that grows with the media's duration.

A timeout is ``BadInput``: both run on a local, complete file (a worker
verified its checksum first), so no network or broker is in the way, and the
bounds are many times what a healthy file needs. Only the file itself stalls
them (a damaged stream, a stated duration that lies), and retrying would hold
a worker for the whole bound again to reach the same end.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import BadInput, PipelineError

#: Seconds ffprobe may take: it reads a file's headers, well under a second for a healthy file.
PROBE_TIMEOUT_S = 60.0
#: Seconds ffmpeg may take to extract audio: this much, plus EXTRACT_S_PER_MEDIA_S per second
#: of media. ffmpeg decodes audio hundreds of times faster than it plays; this allows 10x.
EXTRACT_BASE_S = 60.0
EXTRACT_S_PER_MEDIA_S = 0.1


class Timeout(Exception):
    """An external process outlived its timeout and was killed."""

    def __init__(self, args: list[str], timeout_s: float) -> None:
        super().__init__(f"{args[0]} did not finish within {timeout_s:.0f}s and was killed")
        self.timeout_s = timeout_s


def run_bounded(args: list[str], timeout_s: float) -> subprocess.CompletedProcess[bytes]:
    """Run ``args`` to its end, capturing its output; kill it after ``timeout_s`` (raises Timeout).

    Any exception while waiting (a time limit, a shutdown) kills the process too.
    FileNotFoundError when the program is not installed.
    """
    deadline = time.monotonic() + timeout_s
    with subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        try:
            while True:
                try:
                    out, err = process.communicate(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline:
                        raise Timeout(args, timeout_s) from None
        except BaseException:
            process.kill()
            raise
    return subprocess.CompletedProcess(args, process.returncode, out, err)


def extract_timeout_s(duration: float | None) -> float:
    """Seconds ffmpeg may take to extract the audio of ``duration`` seconds of media."""
    return EXTRACT_BASE_S + EXTRACT_S_PER_MEDIA_S * max(0.0, duration or 0.0)


@dataclass(frozen=True)
class MediaInfo:
    """What ffprobe says of a file."""

    format: str
    duration: float
    has_audio: bool
    has_video: bool

    @property
    def kind(self) -> str:
        return "video" if self.has_video else "audio"


# Containers ffprobe recognises that are not audio or video however they decode:
# images, subtitles, and text or binary files shown as "text art" (tty, bin...).
_NOT_MEDIA = {
    "image2", "png_pipe", "jpeg_pipe", "gif", "svg_pipe", "srt", "webvtt", "ass",
    "tty", "bin", "xbin", "adf", "idf",
}  # fmt: skip


def probe(path: Path, timeout_s: float = PROBE_TIMEOUT_S) -> MediaInfo | None:
    """Audio/video facts of a file, or None when ffprobe finds no playable media in it.

    BadInput when ffprobe does not answer within ``timeout_s``.
    """
    args = ["ffprobe", "-v", "error", "-show_format", "-show_streams", "-of", "json", str(path)]
    try:
        done = run_bounded(args, timeout_s)
    except Timeout:
        raise BadInput(
            f"ffprobe did not finish reading the file within {timeout_s:.0f}s: the file stalls it"
            " (damaged, or not a finished file)"
        ) from None
    except FileNotFoundError as exc:  # ffprobe itself is missing
        raise PipelineError("ffprobe not found: install ffmpeg") from exc
    if done.returncode != 0:
        return None
    try:
        data = json.loads(done.stdout.decode("utf-8", errors="replace"))
    except ValueError:
        return None
    fmt = data.get("format", {})
    if fmt.get("format_name") in _NOT_MEDIA:
        return None
    streams = data.get("streams", [])
    has_audio = any(s.get("codec_type") == "audio" for s in streams)
    has_video = any(
        s.get("codec_type") == "video" and s.get("disposition", {}).get("attached_pic") != 1 for s in streams
    )
    if not has_audio and not has_video:
        return None
    try:
        duration = float(fmt.get("duration") or 0.0)
    except ValueError:
        duration = 0.0
    return MediaInfo(fmt.get("format_name", "?"), duration, has_audio, has_video)


def extract_audio(
    src: Path,
    dest: Path,
    sample_rate: int = 16_000,
    *,
    duration: float | None = None,
    timeout_s: float | None = None,
    span: tuple[float, float] | None = None,
) -> Path:
    """Decode the first audio stream of ``src`` to mono 16-bit WAV at ``dest``; with ``span``,
    only the seconds [start, end) of it (a chunk of a long recording).

    ``timeout_s`` defaults to ``extract_timeout_s(duration)``; without
    ``duration`` the file is probed for it. Raises BadInput when the file has
    no audio, cannot be decoded, or stalls ffmpeg past the timeout.
    """
    if timeout_s is None:
        if duration is None:
            info = probe(src)
            duration = info.duration if info is not None else 0.0
        timeout_s = extract_timeout_s(duration)
    # Seeking on the input while decoding is exact to the sample, and skips what comes before.
    cut = [] if span is None else ["-ss", f"{span[0]:.3f}", "-t", f"{span[1] - span[0]:.3f}"]
    args = [
        "ffmpeg", "-nostdin", "-v", "error", "-xerror", "-y", *cut, "-i", str(src),
        "-map", "0:a:0", "-vn", "-ac", "1", "-ar", str(sample_rate), "-acodec", "pcm_s16le", str(dest),
    ]  # fmt: skip
    try:
        done = run_bounded(args, timeout_s)
    except Timeout:
        raise BadInput(
            f"cannot decode audio: ffmpeg did not finish within {timeout_s:.0f}s"
            f" ({EXTRACT_BASE_S:.0f}s + {EXTRACT_S_PER_MEDIA_S:g}s per second of the file's"
            f" {duration or 0:.0f}s): the file stalls the decoder, or its stated duration is wrong"
        ) from None
    except FileNotFoundError as exc:
        raise PipelineError("ffmpeg not found: install ffmpeg") from exc
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip().splitlines()
        reason = detail[-1].replace(f"{src}: ", "") if detail else "ffmpeg failed"
        if "matches no streams" in reason:
            reason = "the file has no audio track"
        raise BadInput(f"cannot decode audio: {reason}")
    if not dest.exists() or dest.stat().st_size <= 44:
        raise BadInput("cannot decode audio: no audio samples in the file")
    return dest
