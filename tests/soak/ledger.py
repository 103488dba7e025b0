"""The soak's count: every task by id, at the end, as a user would check it.

A task is ``done`` with exactly one output set (its ``done`` event once, each format once,
and in its output folder exactly the files its outputs name, besides the manifest), or
``failed`` with a reason; anything else is a finding, reported with the task's events and
the log lines that name it.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import queue_depth
from tests.shapes.conftest import FINAL, Shape
from tests.soak.nemesis import Strike
from tests.soak.workload import Submission

MANIFEST = ".manifest.json"


def all_tasks(shape: Shape) -> dict[str, dict[str, Any]]:
    """Every task the server knows, by id."""
    tasks: dict[str, dict[str, Any]] = {}
    while True:
        page = shape.stack.get("/api/v1/tasks", params={"limit": 1000, "offset": len(tasks)}, timeout=60)
        batch = page.raise_for_status().json()["tasks"]
        tasks.update((t["id"], t) for t in batch)
        if len(batch) < 1000:
            return tasks


def drain(shape: Shape, timeout: float, sweep_every: float = 15.0) -> bool:
    """Wait until every task has ended and no task message waits in ``cpu`` or ``gpu``, asking
    for a sweep every ``sweep_every`` seconds (``POST /api/v1/workers/sweep``) rather than
    waiting for the minute's; False when ``timeout`` passed first."""
    deadline = time.monotonic() + timeout
    url = shape.stack.env["MORAG_BROKER_URL"]
    next_sweep = 0.0
    while time.monotonic() < deadline:
        try:
            if time.monotonic() >= next_sweep:
                shape.stack.post("/api/v1/workers/sweep", timeout=30)
                next_sweep = time.monotonic() + sweep_every
            ended = all(t["state"] in FINAL for t in all_tasks(shape).values())
            if ended and all(queue_depth(url, queue) == 0 for queue in ("cpu", "gpu")):
                return True
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(2.0)
    return False


@dataclass
class Finding:
    """A task that broke a promise: what, and what explains it.

    Parameters:
      what: ``stuck``, ``doubled``, ``no reason``, ``end not recorded``, ``lost`` or ``canceled``.
      task_id: the task.
      detail: what was seen.
      events: the task's events (``GET /api/v1/tasks/ID``).
      log_lines: the lines of the run's logs that name the task.
    """

    what: str
    task_id: str
    detail: str
    events: list[dict[str, Any]] = field(default_factory=list)
    log_lines: list[str] = field(default_factory=list)

    def text(self) -> str:
        events = "\n".join(f"      {e}" for e in self.events)
        logs = "\n".join(f"      {line}" for line in self.log_lines)
        return f"  {self.what}: {self.task_id}: {self.detail}\n    events:\n{events}\n    logs:\n{logs}"


@dataclass
class Tally:
    """The count of one soak run."""

    submitted: int = 0
    refused: int = 0  # answered 4xx: the file is not taken, no task
    retried: int = 0  # answered only after one or more attempts got no answer
    never_answered: int = 0  # no answer within the submitter's patience
    recorded_unanswered: int = 0  # of those (or of the retried), recorded by the server all the same
    tasks: int = 0
    states: Counter = field(default_factory=Counter)
    by_kind: dict[str, Counter] = field(default_factory=dict)
    failures: Counter = field(default_factory=Counter)  # reasons of failed tasks, first line
    strikes: list[Strike] = field(default_factory=list)
    per_fault: dict[str, Counter] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    drained: bool = True

    @property
    def stuck(self) -> int:
        return self.states["queued"] + self.states["running"]

    def table(self, start: float) -> str:
        lines = [
            f"submitted {self.submitted}: {self.tasks} task(s) recorded, {self.refused} refused at submit, "
            f"{self.retried} answered after a retry, {self.never_answered} never answered "
            f"({self.recorded_unanswered} recorded without an answer)",
            f"ended: done {self.states['done']}, failed {self.states['failed']}, "
            f"canceled {self.states['canceled']}; stuck {self.stuck}; "
            f"doubled {sum(f.what == 'doubled' for f in self.findings)}; "
            f"failed without a reason {sum(f.what == 'no reason' for f in self.findings)}",
            "",
            f"{'kind':<10}{'tasks':>7}{'done':>7}{'failed':>8}{'stuck':>7}",
        ]
        for kind, count in sorted(self.by_kind.items()):
            stuck = count["queued"] + count["running"]
            lines.append(
                f"{kind:<10}{sum(count.values()):>7}{count['done']:>7}{count['failed']:>8}{stuck:>7}"
            )
        lines += ["", f"{'fault':<18}{'struck':>7}{'in flight':>11}{'done':>7}{'failed':>8}{'stuck':>7}"]
        for fault, count in sorted(self.per_fault.items()):
            lines.append(f"{fault:<18}{count['struck']:>7}{count['in flight']:>11}{count['done']:>7}"
                         f"{count['failed']:>8}{count['stuck']:>7}")  # fmt: skip
        lines += ["", "failure reasons:"] + [f"  {n} x {reason}" for reason, n in self.failures.most_common()]
        lines += ["", "fault schedule:"] + [s.line(start) for s in self.strikes]
        if self.findings:
            lines += ["", "findings:"] + [f.text() for f in self.findings]
        return "\n".join(lines)


def log_lines(logs: Path, task_id: str, limit: int = 40) -> list[str]:
    """The last ``limit`` lines of the run's logs that name ``task_id``, each with its log's name."""
    found = [
        f"{path.stem}: {line[:400]}"
        for path in sorted(logs.glob("*.log"))
        for line in path.read_text(errors="replace").splitlines()
        if task_id in line
    ]
    return found[-limit:]


def output_files(shape: Shape, task_id: str) -> list[str]:
    folder = shape.stack.data_dir / "files" / "tasks" / task_id / "output"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def count(shape: Shape, submissions: list[Submission], strikes: list[Strike]) -> Tally:
    """Counts every task of the run by id and checks each; see the module's docstring."""
    tally = Tally(submitted=len(submissions), strikes=strikes)
    # The listing leaves the events out: each task is asked for on its own.
    tasks = {i: shape.stack.get(f"/api/v1/tasks/{i}", timeout=60).raise_for_status().json()
             for i in all_tasks(shape)}  # fmt: skip
    by_name = {t["filename"]: t["id"] for t in tasks.values()}
    kinds: dict[str, str] = {}
    for sub in submissions:
        tally.refused += sub.refused is not None
        tally.retried += sub.task_id is not None and sub.attempts > 1
        if sub.task_id is None and sub.refused is None:
            tally.never_answered += 1
        if sub.task_id is not None and sub.task_id not in tasks:
            tally.findings.append(
                Finding("lost", sub.task_id, f"{sub.name}: answered, then not in the store")
            )
        recorded = by_name.get(sub.name)
        if recorded is not None and recorded != sub.task_id:
            tally.recorded_unanswered += 1
        if recorded is not None:
            kinds[recorded] = sub.kind

    def finding(what: str, task: dict[str, Any], detail: str) -> None:
        tally.findings.append(Finding(what, task["id"], f"{task['filename']}: {detail}", task["events"],
                                      log_lines(shape.stack.logs, task["id"])))  # fmt: skip

    for task_id, task in tasks.items():
        state = task["state"]
        tally.tasks += 1
        tally.states[state] += 1
        tally.by_kind.setdefault(kinds.get(task_id, "other"), Counter())[state] += 1
        names = [e["event"] for e in task["events"]]
        if state not in FINAL:
            finding("stuck", task, f"still {state}")
            continue
        if names.count(state) != 1:
            finding("doubled" if names.count(state) > 1 else "end not recorded", task,
                    f"{state}, with {names.count(state)} '{state}' event(s): {names}")  # fmt: skip
        if state == "canceled":
            finding("canceled", task, "canceled, and no one canceled it")
        elif state == "failed":
            reason = (task["error"] or "").strip()
            tally.failures[reason.splitlines()[0][:160] if reason else "(none)"] += 1
            if not reason:
                finding("no reason", task, "failed without a reason")
        else:
            formats = [o["format"] for o in task["outputs"]]
            wanted = sorted(Path(o["path"]).name for o in task["outputs"])
            files = [name for name in output_files(shape, task_id) if name != MANIFEST]
            if not formats or len(formats) != len(set(formats)) or files != wanted:
                finding("doubled", task, f"outputs {formats}; output files {files}, expected {wanted}")

    for strike in strikes:
        count_ = tally.per_fault.setdefault(strike.fault, Counter())
        count_["struck"] += 1
        count_["in flight"] += len(strike.in_flight)
        for task_id in strike.in_flight:
            state = tasks[task_id]["state"] if task_id in tasks else "lost"
            count_["stuck" if state in ("queued", "running") else state] += 1
    return tally
