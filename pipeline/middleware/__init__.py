"""Dramatiq middleware of morag-pipeline, one concern per module named after its class, and the
stack every morag-pipeline broker runs (``pipeline_middleware``), in order."""

from __future__ import annotations

from dramatiq import Middleware
from dramatiq.middleware import CurrentMessage, Retries

from pipeline.config import Settings
from pipeline.middleware.cancellations import Cancellations
from pipeline.middleware.dead_letters import DeadLetters
from pipeline.middleware.delivery_count import DeliveryCount
from pipeline.middleware.gpu_fallback import GpuFallback
from pipeline.middleware.heartbeat import Heartbeat
from pipeline.middleware.message_signing import MessageSigning
from pipeline.middleware.model_affinity import ModelAffinity
from pipeline.middleware.structured_logs import StructuredLogs
from pipeline.middleware.task_events import TaskEvents
from pipeline.middleware.temp_cleanup import TempCleanup
from pipeline.middleware.time_limit import SlotAwareTimeLimit
from pipeline.middleware.whisper_warmup import WhisperWarmup
from pipeline.middleware.worker_sizing import WorkerSizing


def pipeline_middleware(settings: Settings) -> list[Middleware]:
    """The stack, in order. Of Dramatiq's defaults it keeps ``TimeLimit`` and ``Retries``; its
    ``AgeLimit``, ``ShutdownNotifications``, ``Callbacks`` and ``Pipelines`` serve actor options
    (``max_age``, ``notify_shutdown``, ``on_success``, ``pipe_target``) no actor here uses, and
    each would cost every message its hooks (``bench/broker_throughput.py``). periodiq's middleware,
    which the sweep's ``periodic`` option needs, is added where that actor is declared
    (``pipeline.actors.fleet``), so that a worker boots without periodiq."""
    return [
        StructuredLogs(settings.log_level, settings.log_json),
        TempCleanup(max_age_s=2 * settings.max_time_limit_s),
        # First: control messages are verified before anything acts on them.
        # It signs actor and arguments only, so later changes to options are fine.
        MessageSigning(settings),
        # Stopped while a task waits for a transcription slot (the one a GPU worker prepares).
        SlotAwareTimeLimit(time_limit=settings.max_time_limit_s * 1000),
        # A gpu worker: its transcription slots, one message more than them, the model warmed up.
        WorkerSizing(settings),
        WhisperWarmup(settings),
        # Sees every task start and end, even those skipped by what follows.
        Heartbeat(settings.heartbeat_interval),
        # Guards actors declared with gpu_fallback=True: a GpuError moves the task to cpu.
        GpuFallback(),
        # Before a task runs: skip it if canceled, count its redeliveries.
        Cancellations(),
        DeliveryCount(settings.max_deliveries),
        # A transcription whose model another live worker holds is put back once for it.
        ModelAffinity(settings.whisper_affinity_delay_s),
        # Before Retries: their after_process_message hooks run after Retries
        # decided, DeadLetters last (it may turn the rejection into an ack).
        DeadLetters(),
        TaskEvents(),
        Retries(
            max_retries=settings.max_retries,
            min_backoff=settings.min_backoff_ms,
            max_backoff=settings.max_backoff_ms,
        ),
        CurrentMessage(),
    ]
