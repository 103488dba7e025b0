"""Long recordings: where they are cut (in silence, near the chunk length) and how the chunks'
transcripts are stitched back (times shifted to the millisecond, no word lost or doubled)."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import Settings
from pipeline.errors import BadInput
from pipeline.kinds import SPLIT, TRANSCRIBE, first_stage
from pipeline.processors import media
from pipeline.processors.cuts import SAMPLE_RATE, choose_cuts, chunks_of, speech_spans
from pipeline.processors.transcripts import FORMATS, Segment, Transcript, Word, stitch
from pipeline.routing import Classification, choose_route
from tests.conftest import looped_speech


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 55 s of speech (the sample played six times) as 16 kHz mono WAV."""
    folder = tmp_path_factory.mktemp("long")
    return media.extract_audio(looped_speech(folder / "long.mp3", 5), folder / "long.wav")


def _samples(wav: Path) -> np.ndarray:
    with wave.open(str(wav), "rb") as f:
        return np.frombuffer(f.readframes(f.getnframes()), dtype=np.int16).astype(np.float32) / 32768.0


def _loudness(audio: np.ndarray, at: float, half_s: float = 0.05) -> float:
    """The RMS level of the 100 ms around second ``at``."""
    window = audio[int((at - half_s) * SAMPLE_RATE) : int((at + half_s) * SAMPLE_RATE)]
    return float(np.sqrt(np.mean(window**2)))


def test_a_long_recording_is_cut_only_in_silence_near_the_chunk_length(long_wav: Path) -> None:
    audio = _samples(long_wav)
    duration = len(audio) / SAMPLE_RATE
    speech = list(speech_spans(long_wav, window_s=20.0))  # windows shorter than the file, too
    cuts = choose_cuts(speech, duration, chunk_s=10.0)
    chunks = chunks_of(cuts, duration)
    assert len(chunks) >= 4
    assert all(5.0 <= end - start <= 20.0 for start, end in chunks), chunks
    assert chunks[0][0] == 0.0 and chunks[-1][1] == duration
    for cut in cuts:
        assert not any(start <= cut <= end for start, end in speech), cut
        # Measured on the signal itself, not on the VAD: a cut is quieter than any speech.
        assert _loudness(audio, cut) < 0.1 * float(np.sqrt(np.mean(audio**2))), cut


def test_cuts_fall_in_the_gap_nearest_the_chunk_length() -> None:
    speech = [(0.0, 9.0), (9.5, 14.0), (14.4, 29.0), (29.6, 41.0)]
    # Gaps at 9.25, 14.2 and 29.3: the first chunk ends at the one nearest 10 s; the next cut
    # would be nearest 19.25 s, but 14.2 s leaves a chunk under half of 10 s, so it is 29.3 s.
    assert choose_cuts(speech, 41.0, chunk_s=10.0) == [9.25, 29.3]
    assert choose_cuts(speech, 41.0, chunk_s=8.0) == [9.25, 14.2, 29.3]
    assert choose_cuts(speech, 41.0, chunk_s=25.0) == [14.2]  # 29.3 s would leave 11.7 s
    assert choose_cuts(speech, 41.0, chunk_s=30.0) == []  # not 1.5 chunks long


def test_no_cut_without_silence_or_in_a_short_recording() -> None:
    assert choose_cuts([(0.0, 600.0)], 600.0, chunk_s=60.0) == []  # one long stretch of speech
    assert choose_cuts([(0.0, 5.0), (6.0, 12.0)], 12.0, chunk_s=10.0) == []  # not much over a chunk
    # A gap shorter than the shortest silence that may hold a cut is no gap.
    assert choose_cuts([(0.0, 10.0), (10.05, 20.0), (20.05, 30.0)], 30.0, chunk_s=10.0) == []


def test_only_media_over_the_threshold_is_cut_and_zero_turns_it_off() -> None:
    settings = Settings(split_over_s=20.0, split_chunk_s=10.0)
    assert first_stage(TRANSCRIBE.name, 60.0, settings) == SPLIT.name
    assert first_stage(TRANSCRIBE.name, 20.0, settings) == TRANSCRIBE.name
    assert first_stage(TRANSCRIBE.name, None, settings) == TRANSCRIBE.name
    assert first_stage(TRANSCRIBE.name, 1e6, Settings(split_over_s=0)) == TRANSCRIBE.name
    assert Settings().split_over_s == 1200.0 and Settings().split_chunk_s == 300.0


def _chunk(words: list[tuple[float, float, str]], duration: float, device: str = "cpu") -> Transcript:
    """A chunk's transcript, one segment per sentence (a word ending in '.')."""
    segments, current = [], []
    for start, end, text in words:
        current.append(Word(start, end, f" {text}", 0.9))
        if text.endswith("."):
            segments.append(
                Segment(current[0].start, current[-1].end, "".join(w.word for w in current), current)
            )
            current = []
    return Transcript(segments, "en", duration, "tiny.en", device, "int8", {"transcribe_s": 1.5}, "a.mp3")


def test_stitching_shifts_every_time_by_its_chunk_start_and_keeps_every_word_once() -> None:
    first = _chunk([(0.25, 0.6, "One"), (0.6, 1.1, "two."), (2.0, 2.5, "Three.")], duration=10.123)
    second = _chunk([(0.31, 0.8, "Four"), (0.8, 1.234, "five.")], duration=9.877)
    third = _chunk([(0.001, 0.5, "Six.")], duration=5.5)
    whole = stitch([(0.0, first), (10.123, second), (20.0, third)], source="talk.mp3")
    assert [w.word.strip() for w in whole.words] == ["One", "two.", "Three.", "Four", "five.", "Six."]
    assert [(w.start, w.end) for w in whole.words] == [
        (0.25, 0.6), (0.6, 1.1), (2.0, 2.5), (10.433, 10.923), (10.923, 11.357), (20.001, 20.5)
    ]  # fmt: skip
    assert [(s.start, s.end) for s in whole.segments] == [
        (0.25, 1.1), (2.0, 2.5), (10.433, 11.357), (20.001, 20.5)
    ]  # fmt: skip
    starts = [w.start for w in whole.words]
    assert starts == sorted(starts)
    assert whole.duration == 25.5 and whole.source == "talk.mp3"
    assert whole.timings == {"transcribe_s": 4.5}
    assert whole.text == "One two. Three. Four five. Six."
    # Every format is rendered from the stitched transcript: the last cue is at 20.001 s.
    assert "00:00:20,001 --> 00:00:20,500" in FORMATS["srt"](whole)
    assert "00:00:10.433 --> 00:00:11.357" in FORMATS["vtt"](whole)


def test_no_time_of_a_chunk_runs_past_its_end_into_the_next() -> None:
    # Whisper placed the last word's end 0.3 s past the chunk's 5 s.
    first = _chunk([(4.0, 4.6, "Late"), (4.6, 5.3, "word.")], duration=5.0)
    whole = stitch([(0.0, first), (5.0, _chunk([(0.0, 0.4, "Next.")], duration=5.0))])
    assert [(w.start, w.end) for w in whole.words] == [(4.0, 4.6), (4.6, 5.0), (5.0, 5.4)]
    assert whole.segments[0].end == 5.0


def test_stitching_names_each_device_once() -> None:
    parts = [(0.0, _chunk([(0.1, 0.2, "A.")], 5.0, "cuda")), (5.0, _chunk([(0.1, 0.2, "B.")], 5.0, "cpu"))]
    parts.append((10.0, _chunk([(0.1, 0.2, "C.")], 5.0, "cpu")))
    assert stitch(parts).device == "cuda, cpu"
    with pytest.raises(ValueError, match="no chunks"):
        stitch([])


def test_a_three_hour_recording_fits_every_time_limit_once_cut() -> None:
    settings = Settings()
    hours = 3 * 3600.0
    # Whole, on a CPU worker, it would run past MORAG_MAX_TIME_LIMIT_S: refused.
    with pytest.raises(BadInput, match="MORAG_MAX_TIME_LIMIT_S"):
        choose_route(Classification(TRANSCRIBE.name, "audio", "audio/mpeg", 1, hours), settings, gpu="never")
    # Cut, its first stage and each of its chunks fit a CPU worker's limit.
    kind = first_stage(TRANSCRIBE.name, hours, settings)
    cutting = choose_route(Classification(kind, "audio", "audio/mpeg", 1, hours), settings, gpu="never")
    chunk = Classification(TRANSCRIBE.name, "audio", "audio/mpeg", 1, settings.split_chunk_s * 1.5)
    assert cutting.queue == "cpu" and cutting.time_limit_s <= settings.max_time_limit_s
    assert choose_route(chunk, settings, gpu="never").queue == "cpu"


def test_silence_is_cut_wherever_the_chunks_want_it_and_keeps_clear_of_speech() -> None:
    # Nothing spoken in three hours: cut at every chunk length, not left whole.
    assert choose_cuts([], 10_800.0, 300.0) == [300.0 * n for n in range(1, 36)]
    # A long silence before the first word and after the last holds cuts too, half a second
    # from the speech; a short silence between two words is cut in its middle.
    assert choose_cuts([(700.0, 905.0), (905.4, 1000.0)], 1400.0, 300.0) == [300.0, 600.0, 905.2, 1205.2]
