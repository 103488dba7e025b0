"""Where to cut a long recording: in the silences between speech, near a chunk length.

faster-whisper's shipped Silero VAD (``faster_whisper.vad``) finds the spans of
speech; every cut is the middle of a gap between two of them, so no word is
ever cut in two and the chunks' transcripts, each shifted by its chunk's start,
join into one (``pipeline.chunks``). ``run`` is the runner of the kind that
does this on a CPU worker before the chunks are transcribed.

The audio is read as 16 kHz mono in windows of ``WINDOW_S`` seconds, so a
3-hour recording needs no more memory than a window: a gap is only taken
within one window, never across a window's edge.
"""

from __future__ import annotations

import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import TaskCanceled
from pipeline.processors import media

if TYPE_CHECKING:
    from pipeline.config import Settings
    from pipeline.kinds import Outputs
    from pipeline.processors import Progress

SAMPLE_RATE = 16_000
#: Seconds of audio the VAD reads at once.
WINDOW_S = 600.0
#: The shortest silence between two spans of speech that may hold a cut.
MIN_GAP_S = 0.2
#: How far from speech a cut in a longer silence stays (a shorter one is cut in its middle).
EDGE_S = 0.5

Span = tuple[float, float]


def speech_spans(
    wav: Path, *, window_s: float = WINDOW_S, should_stop: Callable[[], bool] = lambda: False
) -> Iterator[Span]:
    """The spans of speech in a 16 kHz mono 16-bit WAV file, in seconds, in order."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    # Short silences count: a pause between sentences is where a chunk may end.
    options = VadOptions(min_silence_duration_ms=int(MIN_GAP_S * 1000), speech_pad_ms=0)
    with wave.open(str(wav), "rb") as f:
        if f.getframerate() != SAMPLE_RATE or f.getnchannels() != 1 or f.getsampwidth() != 2:
            raise ValueError(f"{wav.name}: not 16 kHz mono 16-bit audio")
        frames = int(window_s * SAMPLE_RATE)
        offset = 0
        while True:
            if should_stop():
                raise TaskCanceled("canceled while finding cuts")
            raw = f.readframes(frames)
            if not raw:
                return
            audio = np.frombuffer(raw, dtype=np.int16).astype(np.float32) / 32768.0
            for found in get_speech_timestamps(audio, options, sampling_rate=SAMPLE_RATE):
                yield (offset + found["start"]) / SAMPLE_RATE, (offset + found["end"]) / SAMPLE_RATE
            offset += len(audio)


def choose_cuts(speech: list[Span], duration: float, chunk_s: float) -> list[float]:
    """Cut points for ``duration`` seconds of media with ``speech`` (spans in order): each in a
    silence (between two spans of speech, before the first or after the last; the whole media
    when nothing is spoken), the point nearest ``chunk_s`` after the previous cut that keeps
    ``EDGE_S`` from speech (the middle of a shorter silence); none leaves a chunk shorter than half
    of ``chunk_s`` (the last one included).

    No cut when the media is not much longer than a chunk, or has no silence to cut in.
    """
    edges = [0.0, *(t for span in speech for t in span), duration]
    silences = [
        (start, end) for start, end in zip(edges[::2], edges[1::2], strict=False) if end - start >= MIN_GAP_S
    ]
    cuts: list[float] = []
    last = 0.0
    while duration - last > 1.5 * chunk_s:
        low, high, wanted = last + chunk_s / 2, duration - chunk_s / 2, last + chunk_s
        fitting = []
        for start, end in silences:
            pad = min(EDGE_S, (end - start) / 2)
            point = min(max(wanted, start + pad), end - pad)
            if low <= point <= high:
                fitting.append(point)
        if not fitting:
            break
        last = min(fitting, key=lambda point: abs(point - wanted))
        cuts.append(round(last, 3))
    return cuts


def chunks_of(cuts: list[float], duration: float) -> list[Span]:
    """The slices [start, end) the cuts make of ``duration`` seconds."""
    edges = [0.0, *cuts, duration]
    return list(zip(edges, edges[1:], strict=False))


def run(
    job: dict[str, Any],
    local: Path,
    folder: Path,
    settings: Settings,
    progress: Progress,
    should_stop: Callable[[], bool],
) -> tuple[Outputs, dict[str, Any]]:
    """The runner that finds the cuts of a long recording: no outputs, and a result that holds
    the chunks (``chunks``: [start, end) in seconds) its task goes on as."""
    declared = (job.get("media") or {}).get("duration")
    progress("extracting audio", 0.0)
    wav = media.extract_audio(local, folder / "audio.wav", SAMPLE_RATE, duration=declared)
    with wave.open(str(wav), "rb") as f:
        duration = f.getnframes() / SAMPLE_RATE
    progress("finding cuts", 0.0)
    speech, shown = [], 0.0
    for span in speech_spans(wav, should_stop=should_stop):
        speech.append(span)
        percent = min(99.0, 100.0 * span[1] / max(duration, 1e-9))
        if percent - shown >= 5:  # a report per 5 %, not one per sentence
            progress("finding cuts", round(percent, 1))
            shown = percent
    chunk_s = float((job.get("media") or {}).get("chunk_s") or settings.split_chunk_s)
    cuts = choose_cuts(speech, duration, chunk_s)
    summary = {
        "duration": round(duration, 3),
        "speech_s": round(sum(end - start for start, end in speech), 3),
        "cuts": cuts,
        "chunks": [[round(s, 3), round(e, 3)] for s, e in chunks_of(cuts, round(duration, 3))],
    }
    return {}, summary
