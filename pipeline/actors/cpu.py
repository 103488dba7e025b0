"""Actors of CPU workers: ``dramatiq pipeline.actors.cpu --queues cpu``.

Every GPU actor is registered here too, so a task moved from ``gpu`` to
``cpu`` runs on a CPU worker instead of being dead-lettered.
"""

from typing import Any

import dramatiq

from pipeline.actors import gpu  # noqa: F401  (registers the GPU actors here)
from pipeline.actors.perform import PERMANENT, perform
from pipeline.brokers import current_broker

broker = current_broker()


@dramatiq.actor(queue_name="cpu", actor_name="convert_document", throws=PERMANENT)
def convert_document(job: dict[str, Any]) -> None:
    """Convert a document to Markdown and docling JSON."""
    perform(job)
