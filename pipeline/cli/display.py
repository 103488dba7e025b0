"""What the CLI shows: progress bars while tasks run, then results."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline import timings
from pipeline.errors import PipelineError
from pipeline.outputs import UnsafeOutput, check_outputs
from pipeline.processors.transcripts import describe_language

FINAL = {"done", "failed", "canceled"}
# States of a file that never became a task: the server refused it, or the CLI stopped before sending it.
NOT_SENT = {"refused", "unsent"}

TaskDict = dict[str, Any]
GetTask = Callable[[str], TaskDict]
GetOutput = Callable[[TaskDict, str], bytes]
Diagnose = Callable[[TaskDict], str]

# Seconds a task may stay as it is (queued, or at the same progress) before the CLI says why.
QUIET_AFTER_S = 15.0


def console(stderr: bool = False) -> Console:
    """A console; tables get room when the output is a file or a pipe."""
    made = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not made.is_terminal:
        made.width = 200
    return made


err = console(stderr=True)
out = console()


def _stage(task: TaskDict) -> str:
    progress = task.get("progress") or {}
    return task["state"] if task["state"] != "running" else progress.get("stage", "running")


def _signature(task: TaskDict) -> tuple[Any, ...]:
    """What changes when a task moves: its state, queue, stage and percent."""
    progress = task.get("progress") or {}
    return task["state"], (task.get("route") or {}).get("queue"), _stage(task), progress.get("percent")


class Watch:
    """When a task last moved, and what was last said about why it does not.

    Parameters:
      quiet_after: seconds without a change before saying why.
      repeat_after: seconds before saying the same reason again.
      clock: the time source (``time.monotonic``).
    """

    def __init__(self, quiet_after: float, repeat_after: float, clock: Callable[[], float]) -> None:
        self.quiet_after = quiet_after
        self.repeat_after = repeat_after
        self.clock = clock
        self.seen: dict[str, tuple[tuple[Any, ...], float]] = {}
        self.said: dict[str, tuple[str, float]] = {}

    def still_for(self, tid: str, task: TaskDict) -> float:
        """Seconds ``task`` has stayed as it is now."""
        now = self.clock()
        signature = _signature(task)
        before = self.seen.get(tid)
        if before is None or before[0] != signature:
            self.seen[tid] = (signature, now)
            self.said.pop(tid, None)
            return 0.0
        return now - before[1]

    def should_say(self, tid: str, reason: str) -> bool:
        now = self.clock()
        last = self.said.get(tid)
        if last is not None and last[0] == reason and now - last[1] < self.repeat_after:
            return False
        self.said[tid] = (reason, now)
        return True


def follow(
    task_ids: list[str],
    names: dict[str, str],
    get_task: GetTask,
    max_poll: float = 1.0,
    *,
    timeout: float | None = None,
    diagnose: Diagnose | None = None,
    quiet_after: float = QUIET_AFTER_S,
    clock: Callable[[], float] = time.monotonic,
    pause: Callable[[float], None] = time.sleep,
) -> list[TaskDict]:
    """Show a bar per task with its stage and percent until every task has ended.

    Returns the last record of every task, in ``task_ids`` order; after
    ``timeout`` seconds (None: no bound) some may not have ended. A task whose
    state and progress stay the same for ``quiet_after`` seconds gets a line on
    stderr with the reason ``diagnose`` gives, again when the reason changes
    and every ``4 * quiet_after`` seconds while it stays. Polls quickly at first
    and more slowly while nothing changes, up to ``max_poll``; ``pause`` waits
    between two looks (a watch of the event stream returns early on a change).
    """
    poll = 0.05
    deadline = None if timeout is None else clock() + timeout
    latest: dict[str, TaskDict] = {}
    watch = Watch(quiet_after, 4 * quiet_after, clock)
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
                task = latest[tid] = get_task(tid)
                progress = task.get("progress") or {}
                stage = _stage(task)
                if progress.get("eta_s"):
                    stage += f" (about {progress['eta_s']:.0f}s left)"
                still = watch.still_for(tid, task)
                if diagnose is not None and task["state"] not in FINAL and still >= quiet_after:
                    reason = diagnose(task)
                    stage = f"{_stage(task)}: {reason}"
                    if watch.should_say(tid, reason):
                        bars.console.print(
                            f"{names[tid]}: {_stage(task)} for {still:.0f}s: {reason}", markup=False
                        )
                percent = 100.0 if task["state"] == "done" else float(progress.get("percent") or 0)
                bars.update(handles[tid], completed=percent, stage=stage)
                if not err.is_terminal and last_stage.get(tid) != _stage(task):
                    last_stage[tid] = _stage(task)
                    err.print(f"{names[tid]}: {last_stage[tid]}", markup=False)
                if task["state"] in FINAL:
                    pending.discard(tid)
            if not pending or (deadline is not None and clock() >= deadline):
                break
            wait = poll if deadline is None else min(poll, max(0.0, deadline - clock()))
            pause(wait)
            poll = min(max_poll, poll * 1.5)
    return [latest[tid] for tid in task_ids]


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
    """Write every output of a task into ``folder``, checking each SHA-256.

    Before anything is written, every output must pass the rule the server
    applies (``pipeline.outputs.check_outputs``: a safe name, a format of the
    task's kind), and no file of those names in ``folder`` may be a symbolic
    link or other than a regular file. Each file is written under a temporary
    name in ``folder`` and renamed onto its own: nothing outside ``folder`` is
    written or followed.
    """
    checked = check_outputs(str(task.get("id")), str(task.get("kind")), task.get("outputs"))
    folder.mkdir(parents=True, exist_ok=True)
    place = folder.resolve()
    targets = []
    for output in checked:
        name = output["path"].rsplit("/", 1)[-1]
        target = place / name
        if target.parent != place:
            raise UnsafeOutput(f"{folder / name}: not inside {folder}; nothing written")
        if target.is_symlink() or (target.exists() and not target.is_file()):
            raise UnsafeOutput(f"{folder / name}: a symbolic link or not a regular file; nothing written")
        targets.append((output, target))
    written = []
    for output, target in targets:
        content = get_output(task, output["format"])
        if hashlib.sha256(content).hexdigest() != output["sha256"]:
            raise ValueError(f"{output['path']}: downloaded content does not match its SHA-256")
        _write_in_place(target, content)
        written.append(folder / target.name)
    return written


def _write_in_place(target: Path, content: bytes) -> None:
    """Write ``content`` to a new file beside ``target`` and rename it onto ``target``.

    The rename replaces whatever ``target`` is (a link included) and never
    writes through it; the new file gets the usual permissions (umask).
    """
    partial = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(partial, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def exit_code(entries: list[TaskDict]) -> int:
    """0 when every task is done; 2 when no file became a task; else 1 (one failed, was refused
    or has not ended)."""
    if all(e["state"] == "done" for e in entries):
        return 0
    if not any(e.get("id") for e in entries):
        return 2
    return 1


def summary(entries: list[TaskDict]) -> str:
    """'3 files: 2 done, 1 refused'."""
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry["state"]] = counts.get(entry["state"], 0) + 1
    return f"{len(entries)} files: " + ", ".join(f"{n} {state}" for state, n in counts.items())


def _show_unfinished(entry: TaskDict) -> None:
    name = entry["filename"]
    if entry["state"] in NOT_SENT:
        return  # said when it happened
    if entry["state"] in FINAL:
        reason = entry.get("error") or entry["state"]
        err.print(f"{name}: {entry['state']}: {reason}", markup=False, style="red")
        return
    reason = entry.get("waiting") or "no reason known"
    err.print(
        f"{name}: not ended, still {entry['state']}: {reason}. The task goes on on the server;"
        f" follow it with `morag-pipeline status {entry['id']}`",
        markup=False,
        style="yellow",
    )


def report(
    entries: list[TaskDict], get_output: GetOutput, *, as_json: bool, output: Path | None, fmt: str | None
) -> int:
    """Print (or write) what every file came to; returns the exit code (``exit_code``).

    ``entries`` are task records and, for files that never became a task, records
    with state ``refused`` or ``unsent`` and the reason in ``error`` (said on stderr
    already, when it happened). A done task whose output cannot be fetched counts as
    not done.
    """
    documents = []
    code = exit_code(entries)
    for task in entries:
        entry = dict(task)
        if task["state"] == "done":
            try:
                chosen = fmt or main_format(task)
                text = get_output(task, chosen).decode("utf-8", errors="replace")
                entry["text"] = text
                if output is not None:
                    entry["files"] = [str(p) for p in write_outputs(task, get_output, output)]
            except (PipelineError, ValueError, OSError) as exc:
                code = max(code, 1)
                entry["output_error"] = str(exc)
                err.print(f"{task['filename']}: done, but its output: {exc}", markup=False, style="red")
                documents.append(entry)
                continue
            if not as_json:
                if output is not None:
                    err.print(f"[green]{task['filename']}[/]: wrote {', '.join(entry['files'])}")
                else:
                    if len(entries) > 1:
                        out.print(f"==> {task['filename']} <==")
                    out.print(text.rstrip("\n"), markup=False)
        else:
            _show_unfinished(entry)
        documents.append(entry)
    if len(entries) > 1 and code != 0:
        err.print(summary(entries), markup=False)
    if as_json:
        json.dump(documents if len(documents) > 1 else documents[0], sys.stdout, indent=2)
        sys.stdout.write("\n")
    return code


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _inference(result: dict[str, Any]) -> str:
    """' (float16, batched by 16)' or ' (int8, 2 CPU threads)': how the transcription decoded."""
    how = result.get("inference") or {}
    parts = [result["compute_type"]] if result.get("compute_type") else []
    if how.get("batched"):
        parts.append(f"batched by {how.get('batch_size')}")
    if how.get("cpu_threads"):
        parts.append(f"{how['cpu_threads']} CPU thread{'s' if how['cpu_threads'] != 1 else ''}")
    return f" ({', '.join(parts)})" if parts else ""


def _running_s(task: TaskDict) -> float | None:
    """Seconds from the task's last start to its end, as the server recorded them; None while it runs."""
    starts = [e["ts"] for e in task.get("events") or [] if e.get("event") == "started"]
    finished = task.get("finished_at")
    return finished - starts[-1] if starts and finished else None


def show_status(task: TaskDict) -> None:
    """A task's state, route and the reasons for it, progress, and events."""
    route = task["route"]
    media = task["input"].get("media", {})
    out.print(f"[bold]{task['id']}[/]  {task['filename']}  [bold]{task['state']}[/]  ({task['kind']})")
    if task["input"].get("url"):
        out.print(f"  url:      {task['input']['url']}", markup=False)
    for stage in task["input"].get("stages", []):
        out.print(f"  stage:    {stage['kind']} done by {stage['worker']}", markup=False)
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
        out.print(f"  ran on:   {result['device']} with {result.get('model')}{_inference(result)}")
    if stages := timings.describe(result.get("timings") or {}, _running_s(task)):
        out.print(f"  timings:  {stages}", markup=False)
    source = result.get("source") or {}
    if source.get("title"):  # what a media URL's page said of it (pipeline.processors.media_urls)
        by = f" by {source['channel']}" if source.get("channel") else ""
        subtitles = ", ".join(source.get("subtitles") or {}) or "none"
        out.print(f"  source:   {source['title']}{by}; subtitles: {subtitles}", markup=False)
    if result.get("language"):
        language = describe_language(
            result["language"], result.get("language_probability"), result.get("task")
        )
        out.print(f"  language: {language}", markup=False)
    for note in result.get("notes", []):
        out.print(f"  note:     {note}", markup=False)
    webhook = task.get("webhook")
    if webhook:
        tries = f" (tries: {webhook['attempts']})" if webhook["attempts"] else ""
        out.print(f"  webhook:  {webhook['state']} -> {webhook['url']}{tries}", markup=False)
        if webhook.get("last_error") and webhook["state"] != "delivered":
            again = (
                f"; next try {_when(webhook['next_attempt_at'])}" if webhook.get("next_attempt_at") else ""
            )
            out.print(f"            last error: {webhook['last_error']}{again}", markup=False)
    out.print("  events:")
    for event in task.get("events", []):
        detail = event.get("detail") or {}
        extra = (
            detail.get("reason") or detail.get("summary") or detail.get("worker") or detail.get("queue") or ""
        )
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
