"""How a transcription decodes: batched (faster-whisper's BatchedInferencePipeline), its batch
size from the free VRAM, CTranslate2's CPU threads from the cores and the worker's concurrency,
and what a worker loads: only its allowed models, and on CUDA only what the free VRAM fits.

Batching is a CUDA default, but BatchedInferencePipeline runs on the CPU too: here it is forced
on with the real tiny.en model, so the batched path is the one the GPU runs, on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_settings
from pipeline.errors import BadInput, GpuError
from pipeline.processors import media, whisper
from pipeline.processors.speech_options import SpeechOptions
from tests.conftest import SPOKEN_WORDS

pytestmark = pytest.mark.usefixtures("no_models_loaded")  # tests/processors/conftest.py


@pytest.fixture(scope="module")
def speech(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return media.extract_audio(samples / "speech.mp3", tmp_path_factory.mktemp("a") / "speech.wav")


def test_batched_on_the_cpu_hears_the_words_with_their_times(speech: Path) -> None:
    options = SpeechOptions(word_timestamps=True)
    batched = whisper.transcribe(speech, device="cpu", batched="on", options=options)
    assert batched.inference == {"batched": True, "batch_size": whisper.DEFAULT_BATCH_SIZE,
                                 "cpu_threads": whisper.available_cores()}  # fmt: skip
    text = batched.text.lower()
    for words in SPOKEN_WORDS:
        assert words in text
    # Batches are cut on speech: the transcript says how much the VAD kept, as with --vad.
    assert batched.speech_duration is not None and 0 < batched.speech_duration <= batched.duration
    # Word timestamps survive batching: every word, in order, inside the recording.
    words = batched.words
    assert [w.word.strip().lower().strip(".,") for w in words][:3] == ["welcome", "to", "the"]
    assert all(0 <= w.start <= w.end <= batched.duration + 0.5 for w in words)
    assert [w.start for w in words] == sorted(w.start for w in words)
    # The JSON transcript and the task's result carry it.
    assert batched.to_dict()["inference"]["batched"] is True

    plain = whisper.transcribe(speech, device="cpu", batched="auto", options=options)
    assert plain.inference["batched"] is False  # auto batches on CUDA only
    assert len(batched.words) == len(plain.words)


def test_a_batch_size_given_is_used_and_the_prompt_still_applies(speech: Path) -> None:
    plain = whisper.transcribe(speech, device="cpu", batched="on", batch_size=2)
    assert plain.inference["batch_size"] == 2
    assert "Graphics Card" not in plain.text and "graphics card" in plain.text
    # The prompt reaches every chunk of a batch: the spelling it shows is followed.
    prompted = whisper.transcribe(
        speech, device="cpu", batched="on", batch_size=2,
        options=SpeechOptions(prompt="Remote Workers, Graphics Card, Recordings."),
    )  # fmt: skip
    assert "Graphics Card" in prompted.text and "recordings" in prompted.text


def test_cpu_threads_are_the_cores_shared_by_the_transcriptions_at_once(speech: Path) -> None:
    assert whisper.cpu_threads_for(cores=16, concurrency=0) == 16  # 0: one at a time on the CPU
    assert whisper.cpu_threads_for(cores=16, concurrency=4) == 4
    assert whisper.cpu_threads_for(cores=16, concurrency=3) == 5
    assert whisper.cpu_threads_for(cores=2, concurrency=4) == 1  # never none
    shared = whisper.transcribe(speech, device="cpu", concurrency=2)
    assert shared.inference["cpu_threads"] == max(1, whisper.available_cores() // 2)
    # Two slots: two CTranslate2 workers share the cores (and the weights), so that two
    # transcriptions run side by side instead of taking turns (on CUDA: tests/gpu/test_batched.py).
    threads = shared.inference["cpu_threads"]
    used = whisper.load_model(whisper.BUNDLED_MODEL, "cpu", "int8", cpu_threads=threads, workers=2)[0]
    assert used.model.num_workers == 2
    one = whisper.transcribe(speech, device="cpu", cpu_threads=1)
    assert one.inference == {"batched": False, "batch_size": None, "cpu_threads": 1}
    assert "graphics card" in one.text.lower()
    # A model loaded with other threads is loaded again with the asked ones, not reused.
    assert (
        whisper.load_model(whisper.BUNDLED_MODEL, "cpu", "int8", cpu_threads=1)[0]
        is not (whisper.load_model(whisper.BUNDLED_MODEL, "cpu", "int8", cpu_threads=2)[0])
    )


def test_batch_size_follows_the_free_vram() -> None:
    large_v2 = 3090.0  # MiB of float16 weights
    # faster-whisper's figures: about 225 MB a chunk for large-v2; 8 GB free fits 25 of them.
    assert whisper.batch_size_for(8000, large_v2) == 25
    assert whisper.batch_size_for(8000, large_v2, concurrency=2) == 12  # two transcriptions share
    assert whisper.batch_size_for(200, large_v2) == 1  # never below one
    assert whisper.batch_size_for(70_000, 75.0) == whisper.MAX_BATCH_SIZE  # tiny on an H100
    assert whisper.batch_size_for(None, large_v2) == whisper.DEFAULT_BATCH_SIZE  # unknown VRAM
    assert whisper.batch_size_for(8000, None) == whisper.DEFAULT_BATCH_SIZE  # unknown size
    # The size is the model.bin of its folder: the bundled tiny.en's 72 MiB; none for a name
    # not in faster-whisper's cache (nothing is fetched to find out).
    assert 60 < (whisper.model_size_mb(whisper.BUNDLED_MODEL) or 0) < 80
    assert whisper.model_size_mb("large-v3-not-downloaded") is None


def test_a_model_outside_the_allowlist_is_refused_as_bad_input(speech: Path) -> None:
    with pytest.raises(whisper.ModelNotAllowed, match="MORAG_WHISPER_ALLOWED_MODELS: base.en") as refused:
        whisper.transcribe(speech, device="cpu", model=whisper.BUNDLED_MODEL, allowed=["base.en"])
    assert isinstance(refused.value, BadInput)  # never retried
    assert whisper.loaded_models() == []  # refused before anything loaded
    allowed = whisper.transcribe(speech, device="cpu", allowed=[whisper.BUNDLED_MODEL, "base.en"])
    assert "remote workers" in allowed.text.lower()


def test_least_recent_models_are_dropped_until_the_free_vram_fits() -> None:
    cache = whisper.ModelCache()
    for name in ("a", "b", "c"):
        cache.add((name, "cuda", "float16"), object())
    # Each model dropped frees 1000 MiB; the new one needs 1000 × LOAD_FACTOR = 1500 MiB.
    free = lambda: 600 + 1000 * (3 - len(cache.loaded()))  # noqa: E731
    whisper.make_room(cache, "d", 1000.0, free)
    assert [name for name, _, _ in cache.loaded()] == ["b", "c"]  # a, the least recently used

    with pytest.raises(GpuError, match=r"needs about 15000 MiB of VRAM .* MiB are free"):
        whisper.make_room(cache, "huge", 10_000.0, free)
    assert cache.loaded() == []  # everything was tried before giving up

    whisper.make_room(whisper.ModelCache(), "hub-name", None, lambda: 0)  # size unknown: not checked
    whisper.make_room(whisper.ModelCache(), "d", 1000.0, lambda: None)  # VRAM unknown: not checked


def test_compute_types_are_checked_and_int8_float16_is_one() -> None:
    assert load_settings(whisper_compute_type="int8_float16").whisper_compute_type == "int8_float16"
    with pytest.raises(ConfigError, match="MORAG_WHISPER_COMPUTE_TYPE: .*int8_float16"):
        load_settings(whisper_compute_type="int9")
    assert load_settings().whisper_batched == "auto"
    assert load_settings(whisper_batched="on", whisper_batch_size=4).whisper_batch_size == 4
