"""How many messages a worker takes from RabbitMQ at once, and how many it transcribes at once."""

from __future__ import annotations

from collections.abc import Container

from dramatiq import Broker, Middleware, Worker

from pipeline.config import Settings, get_settings
from pipeline.identity import record_queues, worker_id
from pipeline.logs import get_logger
from pipeline.processors import slots, whisper

logger = get_logger(__name__)


class WorkerSizing(Middleware):
    """Sets a worker's prefetch so RabbitMQ priorities hold, and a GPU worker's transcription slots.

    Dramatiq prefetches twice as many messages as threads; messages held
    unacked in a worker cannot be overtaken by a later, more urgent one. A
    worker consuming ``gpu`` runs ``S`` transcriptions at once (its slots,
    ``pipeline.processors.slots``: ``MORAG_WHISPER_CONCURRENCY``, or decided
    from the device and its free VRAM) and takes ``S + 1`` messages: the one
    more is downloaded and decoded while the model works, and waits for a
    slot, so the model never waits on I/O and only one message is held
    beyond what runs. That needs ``S + 1`` threads; a worker with fewer
    (``--threads 1``) takes one message per thread, and says so in its log.
    Any other worker takes one message per thread, and has a slot per thread;
    so does a worker of both ``gpu`` and ``cpu`` (the embedded ``run``), whose
    threads take every kind of task.

    Parameters:
      settings: the Whisper settings (default: the process's settings).
      gpus: the GPUs to read the free VRAM of (default: ``hardware.gpu_info()`` at boot).
    """

    def __init__(self, settings: Settings | None = None, gpus: list[dict] | None = None) -> None:
        self._settings = settings
        self._gpus = gpus

    @property
    def settings(self) -> Settings:
        return self._settings or get_settings()

    def before_worker_boot(self, broker: Broker, worker: Worker) -> None:
        queues = worker.consumer_whitelist or broker.get_declared_queues()
        record_queues(queues)
        threads = worker.worker_threads
        if not dedicated_to_gpu(queues):  # every thread runs its own task, transcription included
            slots.slots.resize(max(1, threads))
            worker.queue_prefetch = threads
            return
        decision = self.decide(threads)
        slots.slots.resize(decision.slots)
        prefetch = decision.slots + 1
        log = {"worker": worker_id(), "slots": decision.slots, "reason": decision.reason, "threads": threads}
        if threads < prefetch:
            prefetch = threads
            logger.warning(
                f"GPU worker with {threads} thread(s): it cannot decode the next task while one "
                f"transcribes; start it with --threads {decision.slots + 1}",
                extra={**log, "prefetch": prefetch},
            )
        worker.queue_prefetch = prefetch
        logger.info("transcription slots", extra={**log, "prefetch": prefetch})

    def decide(self, threads: int) -> slots.Decision:
        """This process's slots: the setting, or from the device and its free VRAM."""
        settings = self.settings
        free = None
        try:
            device, _ = whisper.pick_device(settings.whisper_device.value)
        except Exception:  # no CTranslate2 here: a worker that cannot transcribe runs one at a time
            device = "cpu"
        if device == "cuda" and settings.whisper_concurrency == 0:
            free = whisper.free_vram_mb(gpus=self._gpus)
        return slots.decide(
            configured=settings.whisper_concurrency,
            device=device,
            threads=threads,
            model=settings.whisper_model,
            free_vram_mb=free,
        )


def dedicated_to_gpu(queues: Container[str]) -> bool:
    """Whether a worker of ``queues`` is a GPU worker: it consumes ``gpu`` and not ``cpu``."""
    return "gpu" in queues and "cpu" not in queues
