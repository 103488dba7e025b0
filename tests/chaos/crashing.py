"""Test-only: makes a worker process die, as a crashing decoder or the OOM killer would.

A worker loads it after its actors (``dramatiq pipeline.actors.cpu
tests.chaos.crashing``). The process is killed with SIGKILL while it holds
the task's message unacknowledged, so nothing in the worker can count or
report it, exactly as with the kernel's OOM killer:

- ``*poison*`` inputs, every time, before the task runs;
- ``*dies-before-ack*`` inputs, once per worker process, after the task ran
  and reported its completion but before its message was acknowledged.

No part of the pipeline is replaced; this only supplies the crash, since no
input crashes ffmpeg, docling or faster-whisper reliably.
"""

from __future__ import annotations

import os
import signal

from dramatiq import Broker, Middleware
from dramatiq.broker import MessageProxy

from pipeline.brokers import current_broker


def _filename(message: MessageProxy) -> str:
    job = message.kwargs.get("job") or {}
    return str(job.get("filename", ""))


class Crash(Middleware):
    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        if "poison" in _filename(message):
            os.kill(os.getpid(), signal.SIGKILL)

    def after_process_message(self, broker: Broker, message: MessageProxy, **kwargs: object) -> None:
        if "dies-before-ack" in _filename(message) and not message.options.get("deliveries"):
            os.kill(os.getpid(), signal.SIGKILL)


current_broker().add_middleware(Crash())
