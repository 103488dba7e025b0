"""CUDA checks: run only on a machine with an NVIDIA GPU (``pytest -m gpu``).

On a machine without one they are skipped with that reason; the CPU fallback
of ``device=auto`` is covered by every other transcription test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.processors import media, whisper
from tests.conftest import SPOKEN_WORDS

pytestmark = pytest.mark.gpu


def cuda_devices() -> int:
    import ctranslate2

    return ctranslate2.get_cuda_device_count()


@pytest.fixture(autouse=True)
def needs_cuda() -> None:
    if cuda_devices() == 0:
        pytest.skip("no CUDA device on this machine")


def test_auto_picks_cuda_with_float16(samples: Path, tmp_path: Path) -> None:
    wav = media.extract_audio(samples / "talk.mp4", tmp_path / "talk.wav")
    transcript = whisper.transcribe(wav, device="auto")
    assert (transcript.device, transcript.compute_type) == ("cuda", "float16")
    for word in SPOKEN_WORDS:
        assert word in transcript.text.lower()


def test_cpu_and_cuda_agree(samples: Path, tmp_path: Path) -> None:
    wav = media.extract_audio(samples / "speech.mp3", tmp_path / "speech.wav")
    on_gpu = whisper.transcribe(wav, device="cuda")
    on_cpu = whisper.transcribe(wav, device="cpu")
    assert on_gpu.language == on_cpu.language == "en"
    assert len(on_gpu.segments) == len(on_cpu.segments)
