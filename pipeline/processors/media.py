"""Media probing (ffprobe) and audio extraction (ffmpeg), through ffmpeg-python."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ffmpeg

from pipeline.errors import BadInput, PipelineError


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


def probe(path: Path) -> MediaInfo | None:
    """Audio/video facts of a file, or None when ffprobe finds no playable media in it."""
    try:
        data = ffmpeg.probe(str(path))
    except ffmpeg.Error:
        return None
    except FileNotFoundError as exc:  # ffprobe itself is missing
        raise PipelineError("ffprobe not found: install ffmpeg") from exc
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


def extract_audio(src: Path, dest: Path, sample_rate: int = 16_000) -> Path:
    """Decode the first audio stream of ``src`` to mono 16-bit WAV at ``dest``.

    Raises BadInput when the file has no audio or cannot be decoded.
    """
    try:
        (
            ffmpeg.input(str(src))
            .output(str(dest), ac=1, ar=sample_rate, acodec="pcm_s16le", vn=None, map="0:a:0")
            .global_args("-nostdin", "-v", "error", "-xerror")
            .overwrite_output()
            .run(capture_stdout=True, capture_stderr=True)
        )
    except ffmpeg.Error as exc:
        detail = exc.stderr.decode(errors="replace").strip().splitlines()
        reason = detail[-1].replace(f"{src}: ", "") if detail else "ffmpeg failed"
        if "matches no streams" in reason:
            reason = "the file has no audio track"
        raise BadInput(f"cannot decode audio: {reason}") from None
    except FileNotFoundError as exc:
        raise PipelineError("ffmpeg not found: install ffmpeg") from exc
    if not dest.exists() or dest.stat().st_size <= 44:
        raise BadInput("cannot decode audio: no audio samples in the file")
    return dest
