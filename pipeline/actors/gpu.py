"""Actors of GPU workers: ``dramatiq pipeline.actors.gpu --queues gpu``.

faster-whisper runs on CUDA where present, else on the CPU (int8).
"""

from typing import Any

import dramatiq

from pipeline.actors.perform import PERMANENT, perform
from pipeline.brokers import current_broker

broker = current_broker()


# gpu_fallback: a GPU failure (out of memory, no device) moves the task to cpu.
@dramatiq.actor(queue_name="gpu", actor_name="transcribe", throws=PERMANENT, gpu_fallback=True)
def transcribe(job: dict[str, Any]) -> None:
    """Transcribe an audio or video file: JSON, SRT, VTT, TXT and Markdown."""
    perform(job)
