"""``morag-pipeline queues`` and ``morag-pipeline watch``: the task queues, and a live view of the system.

``queues`` shows each queue's depth, consumers, publish and deliver rates,
delayed retries, dead letters, live workers and the expected time to drain
(``GET /api/v1/queues``). ``watch`` redraws workers, queues and running tasks
in place every ``--interval`` seconds until interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pipeline.cli.client import ApiClient
from pipeline.cli.workers_cmd import STYLES, gpu_label, processes_label
from pipeline.config import Settings


def add_commands(commands: argparse._SubParsersAction) -> None:
    queues = commands.add_parser(
        "queues",
        help="the task queues: depth, consumers, rates, dead letters, time to drain",
        description="Each task queue: messages ready, consumers, publish and deliver rates (RabbitMQ's "
        "management API), delayed retries, dead letters, tasks queued and running, live workers, and the "
        "expected time to drain it with them.",
    )
    queues.add_argument("--json", action="store_true")
    watch = commands.add_parser(
        "watch",
        help="a live view of workers, queues and running tasks (Ctrl-C ends it)",
        description="Workers, queues and running tasks, redrawn in place every --interval seconds.",
    )
    watch.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    watch.add_argument("--count", type=int, help="stop after this many refreshes")


def duration(seconds: float | None, work: float = 0.0) -> str:
    """A time to drain for people: ``-`` with no work, ``never`` when no worker is live."""
    if seconds is None:
        return "never (no live worker)" if work > 0 else "-"
    if seconds <= 0:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)


def _rate(rates: dict[str, float | None], name: str) -> str:
    value = rates.get(name)
    return "-" if value is None else f"{value:.1f}/s"


def queues_table(listing: dict[str, Any]) -> Table:
    table = Table("queue", title=None if listing.get("broker_up", True) else "RabbitMQ unreachable")
    for column in ("ready", "consumers", "publish", "deliver", "delayed", "dead letters", "queued",
                   "running", "live workers", "time to drain"):  # fmt: skip
        table.add_column(column, justify="right")
    for name, q in listing["queues"].items():
        rates = q.get("rates") or {}
        live = "-" if name == "control" else f"{q['live_workers']} ({q['live_processes']} proc.)"
        table.add_row(
            name, _count(q["messages"]), _count(q["consumers"]),
            _rate(rates, "publish"), _rate(rates, "deliver"),
            _count(q["delayed"]), _count(q["dead_letters"]),
            "-" if name == "control" else str(q["queued_tasks"]),
            "-" if name == "control" else str(q["running_tasks"]),
            live, "-" if name == "control" else duration(q["drain_s"], q["work_s"]),
        )  # fmt: skip
    return table


def show_queues(listing: dict[str, Any]) -> None:
    from pipeline.cli import display

    display.out.print(queues_table(listing))


def workers_table(listing: dict[str, Any]) -> Table:
    table = Table(
        "worker", "capability", "GPU", "state", "processes", "heartbeat", "current", "done", "failed"
    )
    for w in listing["workers"]:
        table.add_row(
            w["id"], w["capability"], gpu_label(w), Text(w["state"], style=STYLES.get(w["state"], "")),
            processes_label(w), f"{w.get('age_s', 0.0):.0f}s ago", ", ".join(w.get("current") or []) or "-",
            str(w.get("done", 0)), str(w.get("failed", 0)),
        )  # fmt: skip
    return table


def running_table(tasks: list[dict[str, Any]], now: float) -> Table:
    table = Table("task", "file", "queue", "worker", "stage", "progress", "running for")
    for t in tasks:
        progress = t.get("progress") or {}
        percent = progress.get("percent")
        started = t.get("started_at") or now
        table.add_row(
            t["id"][:12], t["filename"], t["route"].get("queue", "?"), t.get("worker") or "-",
            str(progress.get("stage") or "-"), "-" if percent is None else f"{percent:.0f}%",
            f"{max(0.0, now - started):.0f}s",
        )  # fmt: skip
    return table


def watch_view(client: ApiClient, interval: float) -> Group:
    """One frame of ``watch``: workers, queues, running tasks."""
    now = time.time()
    workers = client.workers()
    queues = client.queues()
    running = client.tasks("running", 50)["tasks"]
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    return Group(
        Text(
            f"morag-pipeline at {client.base_url}  {stamp}  (every {interval:g}s; Ctrl-C ends)", style="bold"
        ),
        Text("Workers", style="bold"),
        workers_table(workers),
        Text("Queues", style="bold"),
        queues_table(queues),
        Text(f"Running tasks ({len(running)})", style="bold"),
        running_table(running, now),
    )


def cmd_queues(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.cli import display

    display.emit(ApiClient.from_settings(settings).queues(), args.json, show_queues)
    return 0


def cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.cli import display

    client = ApiClient.from_settings(settings)
    shown = 0
    try:
        with Live(
            watch_view(client, args.interval), console=display.out, screen=False, auto_refresh=False
        ) as live:
            shown = 1
            while args.count is None or shown < args.count:
                time.sleep(args.interval)
                live.update(watch_view(client, args.interval), refresh=True)
                shown += 1
    except KeyboardInterrupt:
        pass
    return 0


COMMANDS = {"queues": cmd_queues, "watch": cmd_watch}
