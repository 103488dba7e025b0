"""Test-only: a task that lasts, and a line in the log when a worker thread stops.

A worker loads it after its actors (``dramatiq pipeline.actors.cpu
tests.chaos.lingering``). Its middleware comes after the pipeline's, so a task
whose input is named ``*linger*`` has begun (its start is marked, it is in the
heartbeat's tasks) and then waits, on its first delivery only, until the worker
is killed; its next delivery runs as any other. When one of the worker's
threads stops (the worker shuts down), it prints ``worker thread stopped``.

No part of the pipeline is replaced; this only supplies a task that lasts
without spending minutes of CPU, and a sign that a thread takes no more work.
"""

from __future__ import annotations

import sys
import time

from dramatiq import Broker, Middleware
from dramatiq.broker import MessageProxy

from pipeline.brokers import current_broker


class Linger(Middleware):
    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        job = message.kwargs.get("job") or {}
        if "linger" in str(job.get("filename", "")) and not message.options.get("deliveries"):
            time.sleep(3600)

    def before_worker_thread_shutdown(self, broker: Broker, thread: object) -> None:
        print("worker thread stopped", file=sys.stderr, flush=True)


current_broker().add_middleware(Linger())
