"""``morag-pipeline workers``: the worker registry, through the server's API."""

from __future__ import annotations

import argparse
from datetime import datetime
from typing import Any

from rich.table import Table

from pipeline.cli.client import ApiClient
from pipeline.config import Settings

STATES = ("alive", "stale", "dead", "gone")
STYLES = {"alive": "green", "stale": "yellow", "dead": "red", "gone": "dim"}


def add_commands(commands: argparse._SubParsersAction) -> None:
    workers = commands.add_parser(
        "workers",
        help="the workers the server knows: state, GPU, current task, counts",
        description="Every worker that sent a heartbeat: id, host, capability, GPU, state, live "
        "processes, last heartbeat, current tasks, done and failed counts. A box started with "
        "--processes N is one worker with N processes. With an ID: that worker's record, its "
        "processes and its history.",
    )
    workers.add_argument("worker_id", nargs="?", metavar="ID", help="show one worker and its history")
    workers.add_argument("--state", action="append", choices=STATES, help="only workers in this state")
    workers.add_argument("--capability", action="append", help="only workers of this capability (gpu, cpu)")
    workers.add_argument("--queue", action="append", help="only workers consuming this queue")
    workers.add_argument("--sweep", action="store_true", help="ask the server to sweep the registry now")
    workers.add_argument("--json", action="store_true")


def select_workers(
    listing: dict[str, Any], capabilities: list[str] | None = None, queues: list[str] | None = None
) -> dict[str, Any]:
    """The listing with only the workers of one of ``capabilities`` that consume one of ``queues``."""
    kept = [
        w
        for w in listing["workers"]
        if (not capabilities or w["capability"] in capabilities)
        and (not queues or set(queues) & set(w.get("queues") or []))
    ]
    return {**listing, "workers": kept}


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.0f}h ago"


def gpu_label(worker: dict[str, Any]) -> str:
    """The GPU column: name and VRAM free/total of each GPU, or '-' without one."""
    labels = []
    for gpu in (worker.get("hardware") or {}).get("gpus") or []:
        label = str(gpu.get("name") or "GPU")
        if gpu.get("vram_total_mb"):
            free = gpu.get("vram_free_mb")
            shown = f"{free / 1024:.0f}/" if isinstance(free, int | float) else ""
            label += f" ({shown}{gpu['vram_total_mb'] / 1024:.0f} GiB)"
        labels.append(label)
    cuda = (worker.get("hardware") or {}).get("cuda") or {}
    if cuda.get("wanted") and not cuda.get("usable"):
        labels.append("CUDA unusable")
    return ", ".join(labels) or "-"


def processes_label(worker: dict[str, Any]) -> str:
    """The processes column: how many take work, and of how many on record when some ended."""
    processes = worker.get("processes") or []
    live = worker.get("live_processes", len(processes))
    return str(live) if live == len(processes) else f"{live} of {len(processes)}"


def show_workers(listing: dict[str, Any]) -> None:
    from pipeline.cli import display

    workers = listing["workers"]
    if not workers:
        display.out.print("no worker has sent a heartbeat yet")
    else:
        table = Table("id", "host", "capability", "GPU", "state")
        table.add_column("processes", justify="right")
        table.add_column("last heartbeat")
        table.add_column("current tasks")
        table.add_column("done", justify="right")
        table.add_column("failed", justify="right")
        for w in workers:
            state = w["state"] + (" (draining)" if w.get("draining") and w["state"] == "alive" else "")
            table.add_row(
                w["id"], w.get("host") or "-", w["capability"], gpu_label(w),
                f"[{STYLES.get(w['state'], '')}]{state}[/]", processes_label(w), _age(w.get("age_s", 0.0)),
                ", ".join(w.get("current") or []) or "-", str(w.get("done", 0)), str(w.get("failed", 0)),
            )  # fmt: skip
        display.out.print(table)
    for queue, view in listing.get("queues", {}).items():
        workers_live = view.get("workers", view["live"])
        line = f"{queue}: {workers_live} live worker(s)"
        if view["live"] != workers_live:
            line += f", {view['live']} processes"
        if not view["live"] and view.get("down_since"):
            line += f", none since {datetime.fromtimestamp(view['down_since']).strftime('%H:%M:%S')}"
        display.out.print(line)
    for sender in listing.get("refused", []):
        at = datetime.fromtimestamp(sender["last_at"]).strftime("%H:%M:%S")
        display.out.print(
            f"[red]refused[/]: {sender['refused']} message(s) from {sender['worker']!r}, last at {at}"
            f" ({sender['last_report']}): {sender['last_reason']}"
        )


def show_worker(worker: dict[str, Any]) -> None:
    from pipeline.cli import display

    out = display.out
    out.print(f"[bold]{worker['id']}[/]  {worker['capability']}  [bold]{worker['state']}[/]", highlight=False)
    if worker.get("reason"):
        out.print(f"  reason:    {worker['reason']}", markup=False)
    pid = f" (pid {worker['pid']})" if worker.get("pid") is not None else ""
    out.print(f"  host:      {worker.get('host')}{pid}, version {worker.get('version')}")
    out.print(f"  queues:    {', '.join(worker.get('queues') or [])}, {worker.get('threads')} thread(s)")
    hardware = worker.get("hardware") or {}
    out.print(
        f"  hardware:  {hardware.get('cpu_cores', '?')} CPU cores, "
        f"{hardware.get('ram_total_mb', 0) / 1024:.0f} GiB RAM; GPU {gpu_label(worker)}"
    )
    for gpu in hardware.get("gpus") or []:
        if gpu.get("driver") or gpu.get("cuda"):
            out.print(f"             driver {gpu.get('driver', '?')}, CUDA {gpu.get('cuda', '?')}")
        if gpu.get("vram_used_mb") is not None:
            out.print(f"             VRAM {gpu['vram_used_mb']} MiB used, {gpu.get('vram_free_mb')} MiB free")
    if isinstance(hardware.get("slots"), dict):
        held = hardware["slots"]
        running = held.get("in_use", 0)
        out.print(f"  slots:     {held.get('slots')} transcription(s) at once, {running} running")
    for problem in (hardware.get("cuda") or {}).get("problems") or []:
        out.print(f"  cuda:      {problem}", markup=False)
    out.print(f"  models:    {', '.join(worker.get('models') or []) or '-'}")
    out.print(f"  current:   {', '.join(worker.get('current') or []) or '-'}")
    out.print(
        f"  counts:    {worker.get('done', 0)} done, {worker.get('failed', 0)} failed,"
        f" {worker.get('skipped', 0)} handed on unrun (moved, canceled)"
    )
    speed = worker.get("speed") or {}
    if speed.get("task_s"):
        rtf = f", {speed['realtime_factor']:.3f}s per media second" if speed.get("realtime_factor") else ""
        out.print(f"  speed:     {speed['task_s']:.1f}s per task{rtf} ({speed.get('samples', 0)} tasks)")
    out.print(f"  heartbeat: {_age(worker.get('age_s', 0.0))}, {worker.get('beats', 0)} since it joined")
    processes = worker.get("processes") or []
    out.print(f"  processes: {processes_label(worker)} live")
    for p in processes:
        state = p["state"] + (" (draining)" if p.get("draining") and p["state"] == "alive" else "")
        out.print(
            f"    pid {p.get('pid')} on {p.get('host') or '?'}  {state:<16}"
            f" heartbeat {_age(p.get('age_s', 0.0))}, {p.get('done', 0)} done, {p.get('failed', 0)} failed,"
            f" current {', '.join(p.get('current') or []) or '-'}  (session {p['session'][:8]})",
            markup=False,
        )
    out.print("  history:")
    for event in worker.get("history", []):
        when = datetime.fromtimestamp(event["ts"]).strftime("%Y-%m-%d %H:%M:%S")
        detail = event.get("detail") or {}
        extra = detail.get("reason") or detail.get("was") or detail.get("host") or ""
        if detail.get("pid") is not None and event["event"].startswith("process"):
            extra = f"pid {detail['pid']}" + (f": {extra}" if extra and extra != detail.get("host") else "")
        out.print(f"    {when}  {event['event']:<15} {extra}", markup=False)


def cmd_workers(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.cli import display

    client = ApiClient.from_settings(settings)
    if args.sweep:
        client.sweep()
        display.err.print("sweep requested")
    if args.worker_id:
        display.emit(client.worker(args.worker_id), args.json, show_worker)
    else:
        listing = select_workers(client.workers(args.state), args.capability, args.queue)
        display.emit(listing, args.json, show_workers)
    return 0


COMMANDS = {"workers": cmd_workers}
