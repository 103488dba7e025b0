"""faster-whisper with the real tiny.en model."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import BadInput, ModelNotFound
from pipeline.processors import media, whisper
from tests.conftest import SPOKEN_WORDS


def auto_device() -> tuple[str, str]:
    """Where ``device="auto"`` runs the model on this machine, and its compute type: CUDA with
    float16 where CTranslate2 sees a device, else the CPU with int8."""
    import ctranslate2

    return ("cuda", "float16") if ctranslate2.get_cuda_device_count() > 0 else ("cpu", "int8")


@pytest.fixture(scope="module")
def wav(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return media.extract_audio(samples / "talk.mp4", tmp_path_factory.mktemp("a") / "talk.wav")


def test_bundled_model_resolves_offline() -> None:
    path = Path(whisper.resolve_model("tiny.en"))
    assert (path / "model.bin").is_file()


def test_missing_models_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="does not exist"):
        whisper.resolve_model("./models/nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="model.bin missing"):
        whisper.resolve_model(str(tmp_path / "empty"))


def test_transcribes_the_spoken_words_with_progress(wav: Path) -> None:
    reports: list[tuple[str, float]] = []
    transcript = whisper.transcribe(wav, progress=lambda stage, pct: reports.append((stage, pct)))
    text = transcript.text.lower()
    for word in SPOKEN_WORDS:
        assert word in text
    assert transcript.language == "en"
    assert (transcript.device, transcript.compute_type) == auto_device()
    assert transcript.duration == pytest.approx(9.2, abs=0.3)
    percents = [pct for stage, pct in reports if stage == "transcribing"]
    assert percents == sorted(percents) and percents[-1] > 50


def test_model_is_loaded_once_per_process(wav: Path) -> None:
    first, _, _ = whisper.load_model("tiny.en")
    whisper.transcribe(wav)
    second, _, _ = whisper.load_model("tiny.en")
    assert first is second
    assert whisper.loaded_models() == [f"tiny.en@{auto_device()[0]}"]


def test_stop_between_segments(wav: Path) -> None:
    transcript = whisper.transcribe(wav, should_stop=lambda: True)
    assert len(transcript.segments) == 1


def test_audio_extraction_refuses_corrupt_media(corrupt_mp4: Path, tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="cannot decode audio: corrupt input packet"):
        media.extract_audio(corrupt_mp4, tmp_path / "out.wav")
