"""Throughput of no-op tasks: our broker setup and middleware against bare Dramatiq and Celery.

In process (``--mode in-process``): both Dramatiq setups run on the same
RabbitMQ, in one fresh vhost each round, in this process: publish N messages
(publisher confirms on for both), then consume them with an in-process worker
of T threads, each prefetching one message per thread (ours does so for
priorities; bare Dramatiq is set to the same). Consume is timed from the
worker's start, its boot included.

Whole worker (``--mode whole-worker``): for ours, bare Dramatiq and Celery,
publish N messages (confirms) to a fresh vhost, then start the worker command
a user runs (one process, T threads, one message prefetched per thread) and
time from the process's start until it has run every message: interpreter
start, imports, broker connection and boot included. Ours is
``dramatiq bench.broker_workers.ours`` (it imports ``pipeline.actors.cpu``:
the real CPU worker's actors, broker and middleware); Celery runs with
``acks_late``, prefetch multiplier 1 and publisher confirms
(``bench/broker_workers/celery_app.py``; the ``bench`` extra installs it).

Rounds interleave the setups; medians are printed, with the ratios. Needs
RabbitMQ and its management API (see ops/setup.sh).

    .venv/bin/python -m bench.broker_throughput --messages 5000 --rounds 3
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import dramatiq
from dramatiq import Worker
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from pipeline.brokers.rabbitmq import build_rabbitmq_broker
from pipeline.config import Settings
from tests.conftest import ROOT, fresh_vhost, queue_depth

BIN = Path(sys.executable).parent

#: The setups the whole-worker mode compares, in the order each round runs them.
WHOLE = ("bare", "ours", "celery")


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
    worker.queue_prefetch = threads  # one per thread, as ours (WorkerSizing) sets at boot
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


def celery_missing() -> str | None:
    """Why Celery cannot be measured here; None when it can."""
    if importlib.util.find_spec("celery") is None:
        return "Celery is not installed: pip install -e '.[bench]' (ops/setup.sh does)"
    if not (BIN / "celery").exists():
        return f"no celery command beside {sys.executable}"
    return None


def publish(system: str, url: str, messages: int) -> None:
    """Publish ``messages`` no-op tasks for ``system``, each confirmed by RabbitMQ."""
    if system == "celery":
        from bench.broker_workers.celery_app import make_app

        app = make_app(url, task=False)
        with app.producer_or_acquire() as producer:
            for n in range(messages):
                app.send_task("noop", (n,), producer=producer)
        app.close()
        return
    broker = ours(url) if system == "ours" else bare(url)

    @dramatiq.actor(broker=broker, queue_name="cpu", actor_name="noop")
    def noop(n: int) -> None:
        pass

    for n in range(messages):
        noop.send(n)
    broker.close()


def worker_command(system: str, threads: int) -> list[str]:
    if system == "celery":
        return [
            str(BIN / "celery"), "-A", "bench.broker_workers.celery_app", "worker", "--pool", "threads",
            "-c", str(threads), "--prefetch-multiplier", "1", "-Q", "cpu", "--loglevel", "WARNING",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
    return [
        str(BIN / "dramatiq"), f"bench.broker_workers.{system}",
        "--processes", "1", "--threads", str(threads), "--queues", "cpu",
    ]  # fmt: skip


def worker_env(
    system: str, url: str, messages: int, done: Path, data_dir: Path, threads: int
) -> dict[str, str]:
    """The environment a user's worker would have: no settings but the broker's (and, for ours,
    a secret to sign its reports with and a data directory)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("MORAG_", "dramatiq_"))}
    env.update(
        BENCH_BROKER_URL=url,
        BENCH_EXPECT=str(messages),
        BENCH_DONE=str(done),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    if system == "ours":
        secret = secrets.token_urlsafe(48)
        env.update(MORAG_BROKER_URL=url, MORAG_SECRET_KEY=secret, MORAG_DATA_DIR=str(data_dir))
    elif system == "bare":
        env["dramatiq_queue_prefetch"] = str(threads)  # ours takes one per thread, for priorities
    return env


def whole_worker(system: str, messages: int, threads: int) -> float:
    """msg/s of one worker process of ``system`` draining ``messages`` no-op tasks, boot included."""
    with fresh_vhost() as url, tempfile.TemporaryDirectory(prefix="bench-broker-") as tmp:
        publish(system, url, messages)
        done, log = Path(tmp) / "done", Path(tmp) / "worker.log"
        env = worker_env(system, url, messages, done, Path(tmp), threads)
        deadline = 120 + messages / 20
        with log.open("wb") as out:
            started = time.perf_counter()
            proc = subprocess.Popen(
                worker_command(system, threads), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            try:
                while not done.exists():
                    if proc.poll() is not None or time.perf_counter() - started > deadline:
                        raise RuntimeError(
                            f"{system} worker stopped or stalled before draining the queue:\n"
                            + log.read_text(errors="replace")[-3000:]
                        )
                    time.sleep(0.002)
                elapsed = time.perf_counter() - started
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        left = queue_depth(url, "cpu")
        if left:
            raise RuntimeError(f"{system}: {left} messages left in queue cpu after the worker stopped")
    return messages / elapsed


def in_process(args: argparse.Namespace) -> None:
    results: dict[str, list[tuple[float, float]]] = {"bare": [], "ours": []}
    for _ in range(args.rounds):
        for name, build in (("bare", bare), ("ours", ours)):
            with fresh_vhost() as url:
                results[name].append(measure(build(url), args.messages, args.threads))
    print(
        f"{args.messages} no-op messages, {args.threads} worker threads (prefetch {args.threads}),"
        f" in process, median of {args.rounds} rounds"
    )
    medians = {}
    for name, runs in results.items():
        medians[name] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
        print(f"  {name:<5} publish {medians[name][0]:8.0f} msg/s   consume {medians[name][1]:8.0f} msg/s")
    print(
        f"  ratio ours/bare: publish {medians['ours'][0] / medians['bare'][0]:.2f}, "
        f"consume {medians['ours'][1] / medians['bare'][1]:.2f}"
    )


def whole(args: argparse.Namespace) -> None:
    missing = celery_missing()
    systems = [s for s in WHOLE if not (s == "celery" and missing)]
    results: dict[str, list[float]] = {s: [] for s in systems}
    for _ in range(args.rounds):
        for system in systems:
            results[system].append(whole_worker(system, args.messages, args.threads))
    print(
        f"{args.messages} no-op messages, one worker process of {args.threads} threads"
        f" (prefetch {args.threads}), boot included, median of {args.rounds} rounds"
    )
    medians = {s: statistics.median(runs) for s, runs in results.items()}
    for system, runs in results.items():
        shown = ", ".join(f"{r:.0f}" for r in runs)
        seconds = args.messages / medians[system]
        print(f"  {system:<6} drain {medians[system]:8.0f} msg/s  {seconds:6.2f} s  (rounds: {shown} msg/s)")
    if missing:
        print(f"  celery drain not measured: {missing}")
    print(f"  ratio ours/bare (whole worker): {medians['ours'] / medians['bare']:.2f}")
    if missing:
        print(f"  ratio ours/celery (whole worker): not measured ({missing})")
    else:
        print(f"  ratio ours/celery (whole worker): {medians['ours'] / medians['celery']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", choices=("both", "in-process", "whole-worker"), default="both")
    args = parser.parse_args()
    if args.mode in ("both", "in-process"):
        in_process(args)
    if args.mode in ("both", "whole-worker"):
        whole(args)


if __name__ == "__main__":
    main()
