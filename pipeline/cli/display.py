"""What the CLI shows: progress bars while tasks run, then results."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

FINAL = {"done", "failed", "canceled"}

TaskDict = dict[str, Any]
GetTask = Callable[[str], TaskDict]
GetOutput = Callable[[TaskDict, str], bytes]


def console(stderr: bool = False) -> Console:
    """A console; tables get room when the output is a file or a pipe."""
    made = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not made.is_terminal:
        made.width = 200
    return made


err = console(stderr=True)
out = console()


def follow(
    task_ids: list[str], names: dict[str, str], get_task: GetTask, max_poll: float = 1.0
) -> list[TaskDict]:
    """Show a bar per task with its stage and percent until every task has ended.

    Polls quickly at first and more slowly while nothing changes, up to ``max_poll``.
    """
    poll = 0.05
    results: dict[str, TaskDict] = {}
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[stage]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=False, disable=not err.is_terminal) as bars:
        handles = {tid: bars.add_task(names[tid], total=100, stage="queued") for tid in task_ids}
        pending = set(task_ids)
        last_stage: dict[str, str] = {}
        while pending:
            for tid in sorted(pending):
                task = get_task(tid)
                progress = task.get("progress") or {}
                stage = task["state"] if task["state"] != "running" else progress.get("stage", "running")
                if progress.get("eta_s"):
                    stage += f" (about {progress['eta_s']:.0f}s left)"
                percent = 100.0 if task["state"] == "done" else float(progress.get("percent") or 0)
                bars.update(handles[tid], completed=percent, stage=stage)
                if not err.is_terminal and last_stage.get(tid) != stage.split(" (")[0]:
                    last_stage[tid] = stage.split(" (")[0]
                    err.print(f"{names[tid]}: {last_stage[tid]}")
                if task["state"] in FINAL:
                    results[tid] = task
                    pending.discard(tid)
            if pending:
                time.sleep(poll)
                poll = min(max_poll, poll * 1.5)
    return [results[tid] for tid in task_ids]


def emit(data: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    """Print ``data`` as JSON for scripts, or hand it to ``render`` for people."""
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        render(data)


def main_format(task: TaskDict) -> str:
    formats = {o["format"] for o in task.get("outputs", [])}
    return "txt" if "txt" in formats else "md"


def write_outputs(task: TaskDict, get_output: GetOutput, folder: Path) -> list[Path]:
    """Write every output of a task into ``folder``, checking each SHA-256."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for output in task["outputs"]:
        content = get_output(task, output["format"])
        if hashlib.sha256(content).hexdigest() != output["sha256"]:
            raise ValueError(f"{output['path']}: downloaded content does not match its SHA-256")
        path = folder / output["path"].rsplit("/", 1)[-1]
        path.write_bytes(content)
        written.append(path)
    return written


def report(
    tasks: list[TaskDict], get_output: GetOutput, *, as_json: bool, output: Path | None, fmt: str | None
) -> int:
    """Print (or write) what the tasks produced; the exit code: 0 if all are done, else 1."""
    code = 0
    documents = []
    for task in tasks:
        entry = dict(task)
        if task["state"] == "done":
            chosen = fmt or main_format(task)
            text = get_output(task, chosen).decode("utf-8", errors="replace")
            entry["text"] = text
            if output is not None:
                entry["files"] = [str(p) for p in write_outputs(task, get_output, output)]
            if not as_json:
                if output is not None:
                    err.print(f"[green]{task['filename']}[/]: wrote {', '.join(entry['files'])}")
                else:
                    if len(tasks) > 1:
                        out.print(f"==> {task['filename']} <==")
                    out.print(text.rstrip("\n"), markup=False)
        else:
            code = 1
            if not as_json:
                reason = task.get("error") or task["state"]
                err.print(f"[red]{task['filename']}: {task['state']}[/]: {reason}", markup=True)
        documents.append(entry)
    if as_json:
        json.dump(documents if len(documents) > 1 else documents[0], sys.stdout, indent=2)
        sys.stdout.write("\n")
    return code


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def show_status(task: TaskDict) -> None:
    """A task's state, route and the reasons for it, progress, and events."""
    route = task["route"]
    media = task["input"].get("media", {})
    out.print(f"[bold]{task['id']}[/]  {task['filename']}  [bold]{task['state']}[/]")
    size = media.get("duration") and f", {media['duration']:.1f}s" or ""
    pages = media.get("pages") and f", {media['pages']} pages" or ""
    out.print(f"  content:  {media.get('format')} ({media.get('mime')}{size}{pages})")
    out.print(f"  route:    queue {route['queue']}, priority {route['priority']}, gpu {route['gpu']}")
    for reason in route.get("reasons", []):
        out.print(f"            - {reason}", markup=False)
    estimates = ", ".join(f"{k[:-2]} ~{v:.0f}s" for k, v in route.get("estimates", {}).items())
    out.print(f"  estimate: {estimates}")
    progress = task.get("progress") or {}
    if task["state"] == "running":
        out.print(f"  progress: {progress.get('stage', '?')} {progress.get('percent', 0):.0f}%")
    if task.get("worker"):
        out.print(f"  worker:   {task['worker']} (attempt {task.get('attempts', 0)})")
    if task.get("error"):
        out.print(f"  [red]error[/]:    {task['error']}")
    result = task.get("result") or {}
    if result.get("device"):
        out.print(f"  ran on:   {result['device']} with {result.get('model')}")
    for note in result.get("notes", []):
        out.print(f"  note:     {note}", markup=False)
    out.print("  events:")
    for event in task.get("events", []):
        detail = event.get("detail") or {}
        extra = detail.get("reason") or detail.get("worker") or detail.get("queue") or ""
        out.print(f"    {_when(event['ts'])}  {event['event']:<10} {extra}", markup=False)


def show_tasks(tasks: list[TaskDict], counts: dict[str, int]) -> None:
    table = Table("id", "file", "state", "queue", "priority", "created", "worker")
    for t in tasks:
        table.add_row(
            t["id"], t["filename"], t["state"], t["route"].get("queue", "?"),
            t["route"].get("priority", "?"), _when(t["created_at"]), t.get("worker") or "-",
        )  # fmt: skip
    out.print(table)
    out.print("  ".join(f"{state}: {n}" for state, n in counts.items()))
