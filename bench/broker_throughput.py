"""Throughput of no-op tasks: our broker setup and middleware against bare Dramatiq.

Both run on the same RabbitMQ, in one fresh vhost each round, in this process:
publish N messages (publisher confirms on for both), then consume them with an
in-process worker of T threads. Prints the median of R rounds and the ratio
ours / bare. Needs RabbitMQ and its management API (see ops/setup.sh).

    .venv/bin/python -m bench.broker_throughput --messages 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import dramatiq
from dramatiq import Worker
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from pipeline.brokers.rabbitmq import build_rabbitmq_broker
from pipeline.config import Settings
from tests.conftest import fresh_vhost


def measure(broker: RabbitmqBroker, messages: int, threads: int) -> tuple[float, float]:
    """(publish msg/s, consume msg/s) of a no-op actor on queue ``cpu``."""
    done = threading.Semaphore(0)

    @dramatiq.actor(broker=broker, queue_name="cpu", actor_name="noop")
    def noop(n: int) -> None:
        done.release()

    started = time.perf_counter()
    for n in range(messages):
        noop.send(n)
    published = time.perf_counter()
    worker = Worker(broker, queues={"cpu"}, worker_threads=threads, worker_timeout=100)
    worker.start()
    consume_start = time.perf_counter()
    for _ in range(messages):
        if not done.acquire(timeout=120):
            raise RuntimeError("messages were lost")
    consumed = time.perf_counter()
    worker.stop()
    broker.close()
    return messages / (published - started), messages / (consumed - consume_start)


def bare(url: str) -> RabbitmqBroker:
    return RabbitmqBroker(url=url, confirm_delivery=True)


def ours(url: str) -> RabbitmqBroker:
    return build_rabbitmq_broker(Settings(broker_url=url))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"bare": [], "ours": []}
    for _ in range(args.rounds):
        for name, build in (("bare", bare), ("ours", ours)):
            with fresh_vhost() as url:
                results[name].append(measure(build(url), args.messages, args.threads))
    print(f"{args.messages} no-op messages, {args.threads} worker threads, median of {args.rounds} rounds")
    medians = {}
    for name, runs in results.items():
        medians[name] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
        print(f"  {name:<5} publish {medians[name][0]:8.0f} msg/s   consume {medians[name][1]:8.0f} msg/s")
    print(
        f"  ratio ours/bare: publish {medians['ours'][0] / medians['bare'][0]:.2f}, "
        f"consume {medians['ours'][1] / medians['bare'][1]:.2f}"
    )


if __name__ == "__main__":
    main()
