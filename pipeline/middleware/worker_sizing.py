"""How many messages a worker takes from RabbitMQ at once."""

from __future__ import annotations

from dramatiq import Broker, Middleware, Worker

from pipeline.identity import record_queues


class WorkerSizing(Middleware):
    """Sets a worker's prefetch so RabbitMQ priorities hold.

    Dramatiq prefetches twice as many messages as threads; messages held
    unacked in a worker cannot be overtaken by a later, more urgent one. A
    worker consuming ``gpu`` takes ``gpu_prefetch`` messages (one: a GPU runs
    one transcription at a time), any other worker one per thread.

    Parameters:
      gpu_prefetch: messages a GPU worker process holds at once.
    """

    def __init__(self, gpu_prefetch: int = 1) -> None:
        self.gpu_prefetch = gpu_prefetch

    def before_worker_boot(self, broker: Broker, worker: Worker) -> None:
        queues = worker.consumer_whitelist or broker.get_declared_queues()
        record_queues(queues)
        if "gpu" in queues:
            worker.queue_prefetch = self.gpu_prefetch
        else:
            worker.queue_prefetch = worker.worker_threads
