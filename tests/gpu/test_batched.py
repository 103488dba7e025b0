"""Batched decoding on CUDA, as a GPU worker runs by default: run only on a machine with an NVIDIA
GPU (``tests/gpu/gpu_check.sh``). The same code path runs on the CPU in
tests/processors/test_whisper_inference.py, with batching forced on; what only a GPU shows is
the batch size chosen from its free VRAM and the int8_float16 compute type.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.processors import media, whisper
from pipeline.processors.speech_options import SpeechOptions
from tests.conftest import SPOKEN_WORDS

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_device")]


def test_cuda_batches_by_default_with_a_batch_size_from_the_free_vram(samples: Path, tmp_path: Path) -> None:
    wav = media.extract_audio(samples / "speech.mp3", tmp_path / "speech.wav")
    free = whisper.free_vram_mb()
    transcript = whisper.transcribe(wav, device="cuda", options=SpeechOptions(word_timestamps=True))
    assert transcript.device == "cuda" and transcript.inference["batched"] is True
    assert transcript.inference["cpu_threads"] is None
    size = transcript.inference["batch_size"]
    assert 1 <= size <= whisper.MAX_BATCH_SIZE
    # tiny.en's 75 MB of weights take 16 MiB a chunk: 1 GiB free fills the largest batch.
    if free is not None and free >= 1024:
        assert size == whisper.MAX_BATCH_SIZE
    for words in SPOKEN_WORDS:
        assert words in transcript.text.lower()
    assert transcript.words and all(w.end <= transcript.duration + 0.5 for w in transcript.words)


def test_int8_float16_loads_and_hears_the_words(samples: Path, tmp_path: Path) -> None:
    wav = media.extract_audio(samples / "speech.mp3", tmp_path / "speech.wav")
    transcript = whisper.transcribe(wav, device="cuda", compute_type="int8_float16", max_loaded=2)
    assert transcript.compute_type == "int8_float16"
    for words in SPOKEN_WORDS:
        assert words in transcript.text.lower()


def test_two_slots_run_the_model_side_by_side(samples: Path, tmp_path: Path) -> None:
    """A process with two slots loads its model with two CTranslate2 workers on CUDA, so that two
    transcriptions run at once instead of taking turns (on the CPU too:
    tests/processors/test_whisper_inference.py)."""
    whisper.drop_models()
    loaded, device, _ = whisper.load_model("tiny.en", "cuda", "float16", workers=2)
    assert device == "cuda" and loaded.model.num_workers == 2
