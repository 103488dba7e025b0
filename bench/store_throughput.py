"""Throughput of the task store: PostgreSQL against SQLite, with the real TaskStore.

Each round opens a fresh store on each backend: SQLite, the default
``tasks.db`` in a new data directory (the baseline), and PostgreSQL, a new
database ``morag_bench_<random>`` on ``MORAG_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``), dropped afterwards. On
each it times:

- submits: N tasks recorded as ``submission.record`` records them
  (``TaskStore.create``: the task row and its "submitted" event);
- control outcomes: for M queued tasks, the started -> progress -> completed
  sequence as the server applies it, each message with a nonce of its own: the
  signing middleware's replay check (``seen``), then the control actor's writes
  (``mark_running``; ``set_progress``; ``get`` and ``mark_done``), from 1 thread
  and from 4 threads at once (M tasks each, one store shared like the server's
  actor threads).

Prints the median of R rounds per backend and the ratios PostgreSQL/SQLite.
When PostgreSQL cannot be reached it prints the SQLite figures and says why
PostgreSQL was skipped.

    .venv/bin/python -m bench.store_throughput --submits 2000 --tasks 400 --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.config import Settings
from pipeline.db import forget_engine
from pipeline.store import FINAL_STATES, State, Task, TaskStore, new_task_id
from tests.conftest import POSTGRES, fresh_postgres_database

#: Thread counts the control outcomes are applied from.
THREADS = (1, 4)

#: Control messages per task: started, progress, completed.
OUTCOMES_PER_TASK = 3


def postgres_unreachable() -> str | None:
    """Why PostgreSQL cannot be used for the bench, or None when it can."""
    import psycopg

    try:
        psycopg.connect(POSTGRES, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"not reachable at {POSTGRES} ({reason})"
    return None


@contextmanager
def sqlite_store() -> Iterator[Path]:
    """The default SQLite file in a new data directory."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Settings(data_dir=Path(tmp)).db_path
        try:
            yield path
        finally:
            forget_engine(path)


def postgres_store() -> contextlib.AbstractContextManager[str]:
    """A new, empty PostgreSQL database (``morag_bench_<random>``); yields its URL, drops it afterwards."""
    return fresh_postgres_database("morag_bench")


def new_task(i: int) -> Task:
    """A queued transcription as ``submission.record`` builds it."""
    task_id = new_task_id()
    filename = f"talk-{i}.mp4"
    media = {"kind": "transcribe", "format": "video", "mime": "video/mp4", "size": 12_345_678,
             "duration": 600.0, "pages": None, "notes": []}  # fmt: skip
    return Task(
        id=task_id,
        kind="transcribe",
        state=State.queued,
        filename=filename,
        input={
            "path": f"tasks/{task_id}/input/{filename}",
            "sha256": "0" * 64,
            "size": 12_345_678,
            "media": media,
        },  # fmt: skip
        options={"priority": "normal", "gpu": "prefer"},
        route={"queue": "gpu", "gpu": "prefer", "priority": 3, "fallback": None},
    )


def outputs_of(task_id: str) -> list[dict]:
    """The five outputs a transcription reports."""
    return [
        {"path": f"tasks/{task_id}/output/talk.{ext}", "sha256": "1" * 64, "size": 4096, "format": ext}
        for ext in ("txt", "srt", "vtt", "json", "md")
    ]


def replay_check(store: TaskStore) -> str:
    """A new message's nonce, checked as the signing middleware checks it before the actor runs."""
    nonce = secrets.token_hex(16)
    if store.seen(nonce):
        raise AssertionError(f"nonce {nonce} seen before")
    return nonce


def run_outcomes(store: TaskStore, task_ids: list[str], worker: str) -> None:
    """started -> progress -> completed for each task, as the control actors apply them."""
    result = {"language": "en", "duration": 600.0}
    for task_id in task_ids:
        if not store.mark_running(task_id, worker, 1, nonce=replay_check(store)):
            raise AssertionError(f"task {task_id} not marked running")
        progress = {"stage": "transcribing", "percent": 50.0, "eta_s": 30.0, "at": time.time()}
        store.set_progress(task_id, progress, nonce=replay_check(store))
        nonce = replay_check(store)
        if store.get(task_id, events=False).state in FINAL_STATES:
            raise AssertionError(f"task {task_id} ended before its completion")
        if not store.mark_done(task_id, outputs_of(task_id), result, worker, nonce=nonce):
            raise AssertionError(f"task {task_id} not marked done")


def outcomes_per_s(store: TaskStore, tasks: int, threads: int) -> float:
    """Control outcomes applied per second from ``threads`` threads, ``tasks`` tasks each (setup untimed)."""
    groups = [[store.create(new_task(i)).id for i in range(tasks)] for _ in range(threads)]
    start = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def work(n: int, ids: list[str]) -> None:
        start.wait()
        try:
            run_outcomes(store, ids, f"gpu-{n}")
        except BaseException as exc:  # reported after the join
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(n, ids)) for n, ids in enumerate(groups)]
    for thread in pool:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in pool:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    if store.counts().get(State.done, 0) < tasks * threads:
        raise AssertionError("not every task was marked done")
    return tasks * threads * OUTCOMES_PER_TASK / elapsed


def measure(target: str | Path, submits: int, tasks: int) -> list[float]:
    """[submits/s, outcomes/s from each of THREADS] on one fresh store."""
    store = TaskStore(target)
    pending = [new_task(i) for i in range(submits)]
    started = time.perf_counter()
    for task in pending:
        store.create(task)
    figures = [submits / (time.perf_counter() - started)]
    for threads in THREADS:
        figures.append(outcomes_per_s(store, tasks, threads))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submits", type=int, default=2000, help="tasks recorded per round")
    parser.add_argument("--tasks", type=int, default=400, help="tasks per thread whose outcomes are applied")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if min(args.submits, args.tasks, args.rounds) < 1:
        parser.error("--submits, --tasks and --rounds must each be at least 1")
    skipped = postgres_unreachable()
    backends: dict[str, Callable] = {"sqlite": sqlite_store}
    if skipped is None:
        backends["postgresql"] = postgres_store
    results: dict[str, list[list[float]]] = {name: [] for name in backends}
    for _ in range(args.rounds):
        for name, backend in backends.items():
            with backend() as target:
                results[name].append(measure(target, args.submits, args.tasks))
    medians = {
        name: [statistics.median(column) for column in zip(*runs, strict=True)]
        for name, runs in results.items()
    }
    print(
        f"task store: {args.submits} submits, {args.tasks} tasks' outcomes per thread "
        f"({OUTCOMES_PER_TASK} each), median of {args.rounds} rounds"
    )
    print(f"  {'':<11}{'submits/s':>10}{'outcomes/s, 1 thread':>22}{'outcomes/s, 4 threads':>23}")
    for name, (submit, one, four) in medians.items():
        print(f"  {name:<11}{submit:10.0f}{one:22.0f}{four:23.0f}")
    if skipped is not None:
        print(f"  ratio postgresql/sqlite: skipped (PostgreSQL {skipped})")
        return
    ratios = [pg / lite for pg, lite in zip(medians["postgresql"], medians["sqlite"], strict=True)]
    print(
        f"  ratio postgresql/sqlite: submits {ratios[0]:.2f}, "
        f"outcomes 1 thread {ratios[1]:.2f}, outcomes 4 threads {ratios[2]:.2f}"
    )


if __name__ == "__main__":
    main()
