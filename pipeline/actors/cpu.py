"""Actors of CPU workers: ``dramatiq pipeline.actors.cpu --queues cpu``.

One actor per kind (``pipeline.kinds``). Every GPU actor is registered here
too, so a task moved from ``gpu`` to ``cpu`` runs on a CPU worker instead of
being dead-lettered.
"""

from pipeline.actors import gpu
from pipeline.actors.perform import declare
from pipeline.brokers import current_broker
from pipeline.kinds import runs_on

broker = current_broker()

actors = {
    **gpu.actors,
    **{kind.name: declare(kind) for kind in runs_on("cpu") if kind.name not in gpu.actors},
}
