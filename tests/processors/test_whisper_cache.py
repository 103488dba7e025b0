"""A worker process keeps at most MORAG_WHISPER_MAX_LOADED_MODELS Whisper models, the least
recently used dropped first, and a model in use finishes its transcription after it is dropped.

The real tiny.en model on the CPU: its int8 and float32 compute types are two models.
"""

from __future__ import annotations

import gc
import logging
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.processors import media, whisper
from pipeline.processors.transcripts import Transcript
from tests.conftest import SPOKEN_WORDS

pytestmark = pytest.mark.usefixtures("no_models_loaded")  # tests/processors/conftest.py


@pytest.fixture
def dropped() -> Iterator[list[dict[str, str]]]:
    """The models the cache logs as dropped, in order."""
    records: list[dict[str, str]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("whisper model dropped"):
                records.append({k: getattr(record, k) for k in ("model", "device", "compute_type")})

    handler = Collect()
    log = logging.getLogger(whisper.__name__)
    old_level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    yield records
    log.removeHandler(handler)
    log.setLevel(old_level)


@pytest.fixture(scope="module")
def wav(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return media.extract_audio(samples / "talk.mp4", tmp_path_factory.mktemp("a") / "talk.wav")


def cpu_model(compute_type: str, max_loaded: int, name: str = whisper.BUNDLED_MODEL) -> object:
    model, device, used = whisper.load_model(name, "cpu", compute_type, max_loaded=max_loaded)
    assert (device, used) == ("cpu", compute_type)
    return model


def freed(ref: weakref.ref) -> bool:
    gc.collect()
    return ref() is None


def test_a_cap_of_one_drops_the_first_model_when_a_second_is_loaded(dropped: list) -> None:
    int8 = weakref.ref(cpu_model("int8", max_loaded=1))
    assert not freed(int8)  # the cache holds it
    float32 = cpu_model("float32", max_loaded=1)
    assert freed(int8)  # dropped, and no one else held it
    assert dropped == [{"model": "tiny.en", "device": "cpu", "compute_type": "int8"}]
    assert whisper.loaded_models() == ["tiny.en@cpu"]
    assert cpu_model("float32", max_loaded=1) is float32  # the one kept is not loaded again


def test_a_cap_of_two_keeps_both_and_drops_the_least_recently_used(dropped: list) -> None:
    int8 = cpu_model("int8", max_loaded=2)
    float32 = weakref.ref(cpu_model("float32", max_loaded=2))
    assert cpu_model("int8", max_loaded=2) is int8
    assert cpu_model("float32", max_loaded=2) is float32()
    assert whisper.loaded_models() == ["tiny.en@cpu", "tiny.en@cpu"]
    assert dropped == []
    # int8 used last: a third model (the same files, named by their folder) drops float32.
    assert cpu_model("int8", max_loaded=2) is int8
    folder = whisper.resolve_model(whisper.BUNDLED_MODEL)
    cpu_model("int8", max_loaded=2, name=folder)
    assert freed(float32)
    assert dropped == [{"model": "tiny.en", "device": "cpu", "compute_type": "float32"}]
    assert cpu_model("int8", max_loaded=2) is int8
    assert whisper.loaded_models() == [f"{folder}@cpu", "tiny.en@cpu"]


def test_a_model_dropped_while_it_transcribes_finishes_the_transcription(wav: Path, dropped: list) -> None:
    # The transcription holds its model and waits, before decoding anything, until the model is
    # dropped from the cache; every segment is then decoded by the dropped model.
    holding, drop_done = threading.Event(), threading.Event()
    after_drop: list[float] = []
    outcome: list[Transcript | BaseException] = []

    def progress(stage: str, percent: float) -> None:
        if stage != "transcribing":
            return
        if not holding.is_set():
            holding.set()
            assert drop_done.wait(300)
        else:
            after_drop.append(percent)

    def transcribe_in_thread() -> None:
        try:
            outcome.append(
                whisper.transcribe(wav, device="cpu", compute_type="int8", max_loaded=1, progress=progress)
            )
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=transcribe_in_thread)
    thread.start()
    try:
        assert holding.wait(300), outcome
        in_use = weakref.ref(cpu_model("int8", max_loaded=1))  # the cache's model, held by the thread
        cpu_model("float32", max_loaded=1)
        assert dropped == [{"model": "tiny.en", "device": "cpu", "compute_type": "int8"}]
        assert not freed(in_use)  # the running transcription still holds it
    finally:
        drop_done.set()
        thread.join(600)
    assert not thread.is_alive()
    [transcript] = outcome
    assert isinstance(transcript, Transcript), transcript
    assert after_drop  # segments came after the drop
    for word in SPOKEN_WORDS:
        assert word in transcript.text.lower(), transcript.text
    assert (transcript.language, transcript.compute_type) == ("en", "int8")
    assert transcript.duration == pytest.approx(9.2, abs=0.3)
    del transcript, outcome[:]
    assert freed(in_use)  # once the transcription let it go, the model is gone


def test_a_cap_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_loaded must be at least 1, not 0"):
        whisper.load_model(whisper.BUNDLED_MODEL, "cpu", "int8", max_loaded=0)
