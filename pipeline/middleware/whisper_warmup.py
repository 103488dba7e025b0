"""Warm-up: a GPU-queue worker loads its default Whisper model at boot, before the first task."""

from __future__ import annotations

import threading

from dramatiq import Broker, Middleware, Worker

from pipeline.config import Settings, get_settings
from pipeline.identity import worker_id
from pipeline.logs import get_logger
from pipeline.middleware.worker_sizing import dedicated_to_gpu
from pipeline.processors import slots, whisper

logger = get_logger(__name__)


class WhisperWarmup(Middleware):
    """Loads the default model in a background thread at a ``gpu`` worker's boot, and transcribes
    one second of silence with it (``whisper.warm``), logging how long each took.

    The warm-up holds a transcription slot from boot until it ends, so the first
    task waits for it instead of loading the model again; downloading and decoding
    that task go on meanwhile. A failure (a GPU fault, a model that cannot be
    loaded) is logged and never stops the worker: its tasks meet the same error and
    are handled as usual (``GpuFallback``). Runs after ``WorkerSizing``, which sizes
    the slots. Workers that do not consume ``gpu``, or consume ``cpu`` too (the embedded
    ``run``, which loads the model when its first file needs it), do nothing.

    Parameters:
      settings: the model and whether to warm up (``MORAG_WHISPER_WARMUP``; default: the
        process's settings).
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings
        self.thread: threading.Thread | None = None

    @property
    def settings(self) -> Settings:
        return self._settings or get_settings()

    def before_worker_boot(self, broker: Broker, worker: Worker) -> None:
        queues = worker.consumer_whitelist or broker.get_declared_queues()
        if not dedicated_to_gpu(queues) or not self.settings.whisper_warmup:
            return
        slots.slots.take()  # here, before any consumer starts: the first task waits for the warm-up
        self.thread = threading.Thread(target=self.warm, name="morag-whisper-warmup", daemon=True)
        self.thread.start()

    def warm(self) -> None:
        """Load and try the model, then give the slot back; logs the outcome, never raises."""
        settings = self.settings
        log = {"worker": worker_id(), "model": settings.whisper_model}
        try:
            done = whisper.warm(
                settings.whisper_model,
                settings.whisper_device.value,
                settings.whisper_compute_type,
                max_loaded=settings.whisper_max_loaded_models,
                cpu_threads=settings.whisper_cpu_threads,
                concurrency=slots.slots.size,
            )
        except Exception as exc:
            logger.error(
                "whisper warm-up failed: the first task loads the model",
                extra={**log, "error": f"{type(exc).__name__}: {exc}"},
            )
        else:
            logger.info("whisper model warmed up", extra={**log, **done})
        finally:
            slots.slots.give()
