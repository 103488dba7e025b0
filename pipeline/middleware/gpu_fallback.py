"""GPU-to-CPU fallback: a task the GPU fails moves to ``cpu`` instead of retrying on the GPU."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from dramatiq import Actor, Broker, Middleware
from dramatiq.broker import MessageProxy
from dramatiq.middleware import CurrentMessage, SkipMessage

from pipeline.config import Settings, get_settings
from pipeline.errors import GpuError
from pipeline.identity import worker_id
from pipeline.logs import get_logger
from pipeline.processors import slots
from pipeline.reporting import reporter_for
from pipeline.routing import fit_job
from pipeline.task_message import gpu_preference, job_of, moved

logger = get_logger(__name__)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether the GPU ran out of memory (CUDA's and CTranslate2's words for it)."""
    return "out of memory" in str(error).lower()


class GpuFallback(Middleware):
    """Hands a task to the ``cpu`` queue when the GPU fails it (out of memory, no device, model load).

    Actors declared with ``gpu_fallback=True`` are guarded: when one raises
    ``pipeline.errors.GpuError`` while running a message of the ``gpu``
    queue, a copy of the message is published to ``cpu`` (with confirm; its
    route says ``cpu`` and ``options["rerouted"]`` keeps the move), the
    server is told (``task_rerouted`` on ``control``), and the original is
    skipped, so it is acknowledged. Retries never sees the error, so the GPU
    is not tried again, and TaskEvents reports no failure: the attempt did
    not fail, it moved.

    Dramatiq gives middleware no way to take back an exception once
    ``after_process_message`` runs (Retries then retries or fails the
    message, whatever the hooks before it did), so the guard is a wrapper
    around the actor's function, installed when the actor is declared.

    A CUDA out-of-memory error while the process ran more than one
    transcription at once (its slots, ``pipeline.processors.slots``) moves
    nothing: the process runs one fewer from then on and the task is retried
    on ``gpu`` as usual (Retries). At one slot the task moves as above.

    Not moved: tasks that require the GPU (``--gpu require``: retried on the
    GPU as usual), tasks too long for a CPU worker (``routing.fit_job``: retried
    on the GPU, the error saying why they stayed), messages of any other queue,
    and a task whose copy could not be published (it is retried as usual,
    nothing is lost). Every worker that may receive the copy must register the
    actor: the CPU worker registers every GPU actor.

    Parameters:
      settings: the time limits and cost model (default: the process's settings).
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings

    @property
    def settings(self) -> Settings:
        return self._settings or get_settings()

    @property
    def actor_options(self) -> set[str]:
        return {"gpu_fallback"}

    def after_declare_actor(self, broker: Broker, actor: Actor) -> None:
        if actor.options.get("gpu_fallback"):
            actor.fn = self._guard(broker, actor.fn)

    def _guard(self, broker: Broker, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except GpuError as exc:
                message = CurrentMessage.get_current_message()
                if message is None:
                    raise
                if self.fewer_slots(message, exc):
                    raise  # Retries tries it again on gpu, with one transcription fewer beside it
                if self.hand_over(broker, message, exc):
                    raise SkipMessage(f"moved to cpu: {exc}") from None
                if stays := self.stays_on_gpu(message):
                    raise GpuError(f"{exc}; {stays}") from exc
                raise

        return guarded

    def fewer_slots(self, message: MessageProxy, error: GpuError) -> bool:
        """A CUDA out-of-memory error on ``gpu`` while the process ran more than one transcription:
        one slot fewer (``slots.Slots.out_of_memory``), and True, the task to be tried again there."""
        if message.queue_name != "gpu" or not is_out_of_memory(error) or not slots.slots.out_of_memory():
            return False
        logger.warning(
            "GPU out of memory: the task is tried again on gpu with one transcription slot fewer",
            extra={"task_id": (job_of(message) or {}).get("task_id"), "worker": worker_id(),
                   "message_id": message.message_id, "slots": slots.slots.size, "error": str(error)},
        )  # fmt: skip
        return True

    def hand_over(self, broker: Broker, message: MessageProxy, error: GpuError) -> bool:
        """Publish the message's copy to ``cpu``; False when it is not eligible or not published."""
        job = job_of(message)
        if message.queue_name != "gpu" or job is None or gpu_preference(job) == "require":
            return False
        task_id = job.get("task_id")
        log = {"task_id": task_id, "worker": worker_id(), "message_id": message.message_id}
        if stays := self.stays_on_gpu(message):
            logger.warning("GPU failure: the task stays on gpu", extra={**log, "reason": stays})
            return False
        reason = f"GPU failed on {worker_id()}: {error}; moved gpu -> cpu"
        copy = moved(message, "cpu", reason, worker_id(), fit_job(job, "cpu", self.settings).time_limit_s)
        try:
            broker.enqueue(copy)
        except Exception as exc:
            logger.warning(
                "GPU failure: cannot move the task to cpu; retrying as usual",
                extra={**log, "error": str(exc)},
            )
            return False
        logger.warning("GPU failure: task moved to cpu", extra={**log, "error": str(error)})
        if task_id:
            # The server records the move, and only then opens the task's files to CPU workers.
            reporter_for(broker).rerouted(task_id, "gpu", "cpu", reason)
        return True

    def stays_on_gpu(self, message: MessageProxy) -> str | None:
        """Why a task that may leave the ``gpu`` queue stays there for its length; None when it may go.

        A task stays when a CPU worker could not finish it within the time limits.
        """
        job = job_of(message)
        if message.queue_name != "gpu" or job is None or gpu_preference(job) == "require":
            return None
        on_cpu = fit_job(job, "cpu", self.settings)
        return None if on_cpu.ok else f"not moved to cpu: too long for a CPU worker ({on_cpu.refused})"
