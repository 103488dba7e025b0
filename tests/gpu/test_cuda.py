"""CUDA checks: run only on a machine with an NVIDIA GPU (``pytest -m gpu``, or
``tests/gpu/gpu_check.sh``, which also fails where no device is seen).

On a machine without one they are skipped with that reason; the CPU fallback
of ``device=auto`` is covered by every other transcription test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipeline import hardware
from pipeline.processors import cuda_libs, media, whisper
from tests.conftest import SPOKEN_WORDS

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_device")]


def test_the_cuda_stack_is_usable_from_the_environment_alone() -> None:
    status = hardware.cuda_status("auto")
    assert status["wanted"] is True
    assert status["problems"] == []
    assert status["usable"] is True
    # Every library CTranslate2 opens came from this environment's NVIDIA packages.
    loaded = status["libraries"]["loaded"]
    assert len(loaded) == len(cuda_libs.LIBRARIES)
    assert all(Path(sys.prefix) in Path(path).parents for path in loaded.values()), loaded
    assert cuda_libs.cublas_probe() is None


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
