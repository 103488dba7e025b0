"""Our CPU worker as users start it, plus a no-op actor:
``dramatiq bench.broker_workers.ours --processes 1 --threads 8 --queues cpu``.

It imports ``pipeline.actors.cpu`` (every actor a CPU worker registers, on the
broker ``pipeline.brokers`` builds from the configuration, with the whole
middleware stack), so the worker's boot is the one users pay.
"""

import dramatiq

import pipeline.actors.cpu  # noqa: F401  (the real worker's actors, broker and middleware)
from bench.broker_workers.counter import hit


@dramatiq.actor(queue_name="cpu", actor_name="noop")
def noop(n: int) -> None:
    hit()
