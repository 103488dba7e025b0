"""Actors of GPU workers: ``dramatiq pipeline.actors.gpu --queues gpu``.

One actor per kind that may run on a GPU worker (``pipeline.kinds``):
transcription (faster-whisper on CUDA where present, else on the CPU, int8)
and images. A kind that may fall back moves to ``cpu`` when the GPU fails it.
"""

from pipeline.actors.perform import declare
from pipeline.brokers import current_broker
from pipeline.kinds import runs_on

broker = current_broker()

actors = {kind.name: declare(kind) for kind in runs_on("gpu")}
