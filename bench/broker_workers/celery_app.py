"""Celery configured for our guarantees, and a no-op task:
``celery -A bench.broker_workers.celery_app worker --pool threads -c 8 --prefetch-multiplier 1 -Q cpu``.

Acknowledged after the task ran (``task_acks_late``, a task lost with its
worker is delivered again), publisher confirms, one message prefetched per
thread, persistent messages on a durable queue with priorities (``x-max-priority``
10, as ours). Gossip, mingle and the worker heartbeat, cluster features none
of our guarantees needs, are off on the command line, so Celery's boot is not
inflated by them.
"""

import os

from celery import Celery

from bench.broker_workers.counter import hit


def make_app(url: str, task: bool = True) -> Celery:
    """The app; with ``task``, its no-op task too (the worker runs it, the publisher names it)."""
    app = Celery("bench", broker=url.replace("amqp://", "pyamqp://", 1))
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"confirm_publish": True},
        task_default_queue="cpu",
        task_queue_max_priority=10,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )

    if task:

        @app.task(name="noop")
        def noop(n: int) -> None:
            hit()

    return app


app = make_app(os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/"))
