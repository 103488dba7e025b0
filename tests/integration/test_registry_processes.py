"""A box started with ``--processes 2`` is one worker with two processes (real RabbitMQ, server, dramatiq)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Stack, wait_for

NAME = "cpu-box"


def listing(stack: Stack) -> dict[str, Any]:
    return stack.get("/api/v1/workers", timeout=10).raise_for_status().json()


def box(stack: Stack) -> dict[str, Any] | None:
    return next((w for w in listing(stack)["workers"] if w["id"] == NAME), None)


def page(stack: Stack) -> dict[str, Any]:
    return stack.get(f"/api/v1/workers/{NAME}", timeout=10).raise_for_status().json()


def parent_of(pid: int) -> int:
    # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after its ")".
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.slow
def test_a_two_process_box_is_one_worker_and_a_stopped_process_ends_alone(stack: Stack) -> None:
    stack.start_server()
    stack.start_worker("cpu", name=NAME, processes=2, MORAG_HEARTBEAT_INTERVAL="0.5")
    master = stack.processes[NAME]

    def both_beating() -> dict[str, Any] | None:
        found = box(stack)
        live = [p for p in (found or {}).get("processes", []) if p["state"] == "alive"]
        return found if len(live) == 2 and all(p["beats"] >= 4 for p in live) else None

    wait_for("both processes of the box beating", both_beating, 120, stack)

    # What `morag-pipeline workers --json` shows: one worker, two processes, each of the box's command.
    shown = stack.cli("workers", "--json")
    assert shown.returncode == 0, shown.stderr
    workers = json.loads(shown.stdout)
    [worker] = [w for w in workers["workers"] if w["id"] == NAME]
    assert [w["id"] for w in workers["workers"]].count(NAME) == 1
    assert (worker["state"], worker["capability"], worker["live_processes"]) == ("alive", "cpu", 2)
    pids = sorted(p["pid"] for p in worker["processes"])
    assert len(set(pids)) == 2 and all(parent_of(pid) == master.pid for pid in pids), (pids, master.pid)
    assert (workers["queues"]["cpu"]["live"], workers["queues"]["cpu"]["workers"]) == (2, 1)
    # Eight heartbeats and more, from two sessions in turn: it joined once.
    assert [e["event"] for e in page(stack)["history"]] == ["joined", "process joined"]
    readable = stack.cli("workers")
    assert "cpu: 1 live worker(s), 2 processes" in readable.stdout, readable.stdout

    # One process stopped: its goodbye ends that process only. Dramatiq then stops the whole
    # command (a worker process that exits takes its siblings down), so the other one says
    # goodbye too, and only then is the box gone.
    victim = pids[0]
    os.kill(victim, signal.SIGTERM)
    master.wait(timeout=120)
    ended = wait_for(
        "the box gone", lambda: (box(stack) or {}).get("state") == "gone" and page(stack), 60, stack
    )
    events = [e for e in ended["history"] if e["event"] != "draining"]
    assert [e["event"] for e in events] == ["joined", "process joined", "process gone", "gone"], events
    assert {events[2]["detail"]["pid"], events[3]["detail"]["pid"]} == set(pids)
    assert events[2]["detail"]["processes_left"] == 1
    assert {(p["pid"], p["state"], p["reason"]) for p in ended["processes"]} == {
        (pid, "gone", "said goodbye") for pid in pids
    }
    assert ended["live_processes"] == 0 and ended["current"] == []
