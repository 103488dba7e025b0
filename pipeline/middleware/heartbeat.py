"""Heartbeats: a worker tells the server, every few seconds, that it lives and what it does."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from typing import Any

from dramatiq import Broker, Middleware, Worker
from dramatiq.broker import MessageProxy

from pipeline import __version__, control, hardware
from pipeline.config import Settings, get_settings
from pipeline.identity import worker_id
from pipeline.logs import get_logger
from pipeline.processors import captions, cuda_libs
from pipeline.task_message import job_of, task_id_of

logger = get_logger(__name__)

#: Queues whose workers report; the server's own consumer of ``control`` does not.
TASK_QUEUES = ("gpu", "cpu")
#: Weight of the newest task in the moving averages of a worker's speed.
SPEED_WEIGHT = 0.3


def seal(kind: str, beat: dict[str, Any]) -> dict[str, Any]:
    """The message arguments that carry a heartbeat or a goodbye to the server.

    The one place a heartbeat is wrapped before it leaves the worker;
    ``pipeline.actors.fleet.unseal`` is its counterpart. Worker id and
    capability sit beside the beat, where MessageSigning (which signs every
    ``control`` message a worker with a token publishes) checks them against
    the worker's token.
    """
    return {"worker": beat["worker"], "capability": beat["capability"], "beat": {**beat, "kind": kind}}


class Heartbeat(Middleware):
    """Sends a heartbeat to the ``control`` queue every ``interval`` seconds.

    At boot the worker checks that it can transcribe on CUDA where a GPU is
    seen or CUDA is asked for (``check_cuda``), and says so in its log. A
    thread started at worker boot sends the worker's id, host, capability
    (``gpu`` if it consumes the ``gpu`` queue, else ``cpu``), queues,
    hardware (with that check's finding under ``cuda``), loaded models, the
    tasks in flight, done and failed counts, measured speed and version.
    While the worker shuts down cleanly its beats say ``draining``; once it
    has stopped it sends a goodbye. Workers of the ``control`` queue alone
    (the server) send nothing.

    Each process of a worker beats on its own, under a session of its own
    made at boot, with the worker's shared name (``pipeline.identity``) and
    its own pid and tasks: the server's registry shows a box started with
    ``--processes N`` as one worker with N processes, and one process's
    goodbye ends only that process.

    Messages name their actor (``worker_heartbeat``, ``worker_goodbye``), so
    workers need not import the server's actors.

    Parameters:
      interval: seconds between two heartbeats; 0 sends none.
    """

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.session = uuid.uuid4().hex
        self._broker: Broker | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._in_flight: dict[str, str] = {}  # message id -> task id
        self._started: dict[str, float] = {}
        self._counts = {"done": 0, "failed": 0, "skipped": 0}
        self._speed: dict[str, float] = {}
        self._samples = 0
        self._queues: list[str] = []
        self._threads = 0
        self._draining = False
        self._seq = 0
        self._boot = 0.0
        self._hardware: dict[str, Any] = {}
        self._smi = False
        self._cuda: dict[str, Any] = {}

    # Worker life.
    def after_worker_boot(self, broker: Broker, worker: Worker) -> None:
        queues = sorted(worker.consumer_whitelist or broker.get_declared_queues())
        if not any(q in TASK_QUEUES for q in queues):
            return
        self._cuda = check_cuda()
        check_caption_model()
        if self.interval <= 0:
            return
        self.session = uuid.uuid4().hex  # a fresh session for every boot, even in a forked process
        self._broker = broker
        self._queues = [q for q in queues if not q.endswith((".DQ", ".XQ"))]
        self._threads = worker.worker_threads
        self._boot = time.time()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="morag-heartbeat", daemon=True)
        self._thread.start()

    def before_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        if self._thread is None:
            return
        self._draining = True
        self._send(control.WORKER_HEARTBEAT, "beat")

    def after_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=max(5.0, self.interval))
        self._thread = None
        self._send(control.WORKER_GOODBYE, "goodbye")

    # Tasks.
    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        task_id = _task_id(message)
        if task_id is None:
            return
        with self._lock:
            self._in_flight[message.message_id] = task_id
            self._started[message.message_id] = time.monotonic()

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: object = None,
        exception: BaseException | None = None,
    ) -> None:
        self._finished(message, "done" if exception is None else "failed")

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        self._finished(message, "skipped")

    def _finished(self, message: MessageProxy, outcome: str) -> None:
        with self._lock:
            if self._in_flight.pop(message.message_id, None) is None:
                return
            began = self._started.pop(message.message_id, time.monotonic())
            self._counts[outcome] += 1
            if outcome != "done":
                return
            elapsed = time.monotonic() - began
            self._measure("task_s", elapsed)
            job = job_of(message) or {}
            duration = (job.get("media") or {}).get("duration")
            if duration:  # media: its speed is measured per second of it
                self._measure("realtime_factor", elapsed / duration)
            self._samples += 1

    def _measure(self, name: str, value: float) -> None:
        old = self._speed.get(name)
        self._speed[name] = value if old is None else (1 - SPEED_WEIGHT) * old + SPEED_WEIGHT * value

    # The heartbeat itself.
    def beat(self) -> dict[str, Any]:
        """What this worker reports now."""
        from pipeline.processors.slots import slots
        from pipeline.processors.whisper import loaded_models

        if not self._hardware or self._smi:
            self._hardware = hardware.describe()
            self._smi = any("vram_free_mb" in gpu and "driver" in gpu for gpu in self._hardware["gpus"])
        else:
            self._hardware.update(hardware.cpu_info())
        for gpu in self._hardware.get("gpus") or []:
            if gpu.get("vram_total_mb") is not None and gpu.get("vram_free_mb") is not None:
                gpu["vram_used_mb"] = gpu["vram_total_mb"] - gpu["vram_free_mb"]
        if "gpu" in self._queues:  # its transcription slots (pipeline.processors.slots)
            self._hardware["slots"] = slots.describe()
        with self._lock:
            self._seq += 1
            return {
                "worker": worker_id(),
                "session": self.session,
                "seq": self._seq,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "capability": "gpu" if "gpu" in self._queues else "cpu",
                "queues": self._queues,
                "threads": self._threads,
                "hardware": {**self._hardware, "cuda": self._cuda} if self._cuda else self._hardware,
                "models": loaded_models(),
                "current": sorted(set(self._in_flight.values())),
                **self._counts,
                "speed": {**{k: float(f"{v:.4g}") for k, v in self._speed.items()}, "samples": self._samples},
                "draining": self._draining,
                "version": __version__,
                "booted_at": self._boot,
                "ts": time.time(),
            }

    def _send(self, actor_name: str, kind: str) -> None:
        if self._broker is None:
            return
        try:
            kwargs = seal(kind, self.beat())
            with self._send_lock:
                control.send(self._broker, actor_name, **kwargs)
        except Exception as exc:
            logger.warning(f"{kind} not sent", extra={"worker": worker_id(), "error": str(exc)})

    def _run(self) -> None:
        while not self._stop.is_set():
            self._send(control.WORKER_HEARTBEAT, "beat")
            self._stop.wait(self.interval)


def check_caption_model(settings: Settings | None = None) -> str | None:
    """At boot: say (an error in the log) when the configured caption model's folder cannot be one;
    image tasks would fail with the same reason. Returns it; None when unset or plausible."""
    folder = (settings or get_settings()).caption_model_path
    reason = captions.problem(folder) if folder is not None else None
    if reason is not None:
        logger.error("the caption model cannot be loaded: image tasks will fail", extra={"reason": reason})
    return reason


def check_cuda(settings: Settings | None = None) -> dict[str, Any]:
    """``hardware.cuda_status`` for this worker's settings, logged: an error when a GPU is
    seen (or CUDA asked for) but cannot be used, naming why; a line when it is ready."""
    settings = settings or get_settings()
    try:
        status = hardware.cuda_status(
            settings.whisper_device.value, cuda_libs.dirs_from(settings.cuda_library_path)
        )
    except Exception as exc:  # a probe must never stop a worker from booting
        status = {"wanted": True, "usable": False, "devices": 0, "problems": [f"CUDA check failed: {exc}"]}
    if status["wanted"] and not status["usable"]:
        logger.error(
            "CUDA unusable: this worker will not transcribe on its GPU; GPU tasks move to the cpu queue",
            extra={"worker": worker_id(), "device": settings.whisper_device.value,
                   "problems": status["problems"]},
        )  # fmt: skip
    elif status["wanted"]:
        logger.info(
            "CUDA ready",
            extra={"worker": worker_id(), "devices": status["devices"],
                   "libraries": status["libraries"]["loaded"]},
        )  # fmt: skip
    return status


def _task_id(message: MessageProxy) -> str | None:
    if message.queue_name.split(".")[0] not in TASK_QUEUES:
        return None
    return task_id_of(message)
