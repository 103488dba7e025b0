"""Model affinity: a task goes to a worker that holds its Whisper model loaded, where one is live."""

from __future__ import annotations

from dramatiq import Broker, Middleware
from dramatiq.broker import MessageProxy
from dramatiq.errors import BrokerConnectionError
from dramatiq.middleware import SkipMessage

from pipeline.identity import worker_id
from pipeline.logs import get_logger
from pipeline.reporting import reporter_for
from pipeline.task_message import affinity_of, job_of

logger = get_logger(__name__)

#: The message option that records the deferral: the worker that put the task back.
DEFERRED = "affinity_deferred"


class ModelAffinity(Middleware):
    """Puts a transcription back once when this worker does not hold its model and another does.

    The server names in the job the live workers of its queue that hold the model the task
    asks for (``task_message.affinity_of``, from their heartbeats). One GPU queue feeds every
    GPU worker, so the broker may hand the task to any of them; a worker that is not among the
    holders, and has not loaded the model since, publishes the message again after
    ``delay_s`` (its delay queue; ``options["affinity_deferred"]`` names this worker) and
    skips it, so a holder can take it instead of this worker loading the model a second time.
    A message put back once is run by whichever worker takes it next: a busy holder costs a
    task ``delay_s`` at most. The server hears a ``deferred`` note.

    Not put back: messages of another queue than the one the holders were seen on (a task
    moved to ``cpu``), jobs that name no holder, and a message whose copy cannot be published
    (it runs here).

    Parameters:
      delay_s: seconds the task waits before it is offered again; 0 turns deferral off.
    """

    def __init__(self, delay_s: float = 3.0) -> None:
        self.delay_s = delay_s

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        if self.delay_s <= 0 or message.options.get(DEFERRED):
            return
        job = job_of(message)
        affinity = affinity_of(job) if job is not None else {}
        holders = affinity.get("workers") or []
        if not holders or message.queue_name != affinity.get("queue") or worker_id() in holders:
            return
        model = str(affinity.get("model") or "")
        if self.holds(model):
            return
        task_id = job.get("task_id") if job else None
        log = {"task_id": task_id, "worker": worker_id(), "model": model, "holders": holders}
        try:
            broker.enqueue(message.copy(options={DEFERRED: worker_id()}), delay=int(self.delay_s * 1000))
        except BrokerConnectionError as exc:
            logger.warning(
                "model affinity: task not put back, it runs here", extra={**log, "error": str(exc)}
            )
            return
        logger.info("model affinity: task put back for a worker that holds its model", extra=log)
        if task_id:
            detail = {"model": model, "holders": holders, "delay_s": self.delay_s}
            reporter_for(broker).note(task_id, "deferred", detail)
        raise SkipMessage(f"put back for a worker that holds {model}")

    @staticmethod
    def holds(model: str) -> bool:
        """Whether this process has ``model`` loaded (on any device)."""
        from pipeline.processors.whisper import loaded_models

        return any(name.rpartition("@")[0] == model for name in loaded_models())
