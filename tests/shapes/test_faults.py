"""The README's shape under one fault at a time: every task ends, with exactly one output set,
nothing is left queued or running, and the events say what happened.

The tests share one shape (server, plain CPU worker, enrolled two-process GPU box in its own
network namespace); each starts again what an earlier fault left stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import SAMPLES, queue_info, wait_for
from tests.shapes.conftest import FINAL, TALLY, Shape, check_every_task_ended

pytestmark = [pytest.mark.shapes, pytest.mark.slow, pytest.mark.rabbitmq]

SPEECH, TALK, REPORT = SAMPLES / "speech.mp3", SAMPLES / "talk.mp4", SAMPLES / "report.html"


def task_ids(shape: Shape) -> set[str]:
    with shape.api as api:
        return {
            t["id"]
            for t in api.get("/api/v1/tasks", params={"limit": 1000}).raise_for_status().json()["tasks"]
        }


def wait_running(shape: Shape, ids: list[str], count: int, worker: str | None = None) -> None:
    def running() -> bool:
        tasks = [shape.task(i) for i in ids]
        return sum(t["state"] == "running" and worker in (None, t["worker"]) for t in tasks) >= count

    wait_for(f"{count} task(s) running" + (f" on {worker}" if worker else ""), running, 180, shape.stack, 0.5)


def events(task: dict, name: str) -> list[dict]:
    return [e for e in task["events"] if e["event"] == name]


@pytest.mark.timeout(400)
def test_multi_file_submit_with_a_corrupt_file_in_the_middle(
    shape: Shape, tmp_path: Path, docx_file: Path
) -> None:
    shape.ensure()
    a, corrupt, b = tmp_path / "a.mp4", tmp_path / "corrupt.mp4", tmp_path / "b.docx"
    shutil.copy(TALK, a)
    corrupt.write_bytes(b"this is a text file, not a video\n" * 100)
    shutil.copy(docx_file, b)
    before = task_ids(shape)

    try:
        proc = shape.cli("submit", str(a), str(corrupt), str(b), timeout=300)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"`submit a.mp4 corrupt.mp4 b.docx` never returned\n{shape.stack.all_logs()}"
        ) from None

    made = sorted(task_ids(shape) - before)
    assert proc.returncode == 1, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    refused = [line for line in proc.stderr.splitlines() if "corrupt.mp4" in line]
    assert refused, f"the refused file is not named on stderr:\n{proc.stderr}"
    tasks = check_every_task_ended(shape, "multi-file submit, corrupt file in the middle", made)
    assert sorted(t["filename"] for t in tasks.values()) == ["a.mp4", "b.docx"]
    assert all(t["state"] == "done" for t in tasks.values()), {
        t["filename"]: t["error"] for t in tasks.values()
    }
    for name in ("a.mp4", "b.docx"):  # every result is shown
        assert f"==> {name} <==" in proc.stdout, proc.stdout


@pytest.mark.timeout(400)
def test_a_control_handler_that_fails_on_its_first_attempt(shape: Shape, long_audio: Path) -> None:
    shape.ensure()
    [task_id] = shape.submit(long_audio)
    wait_running(shape, [task_id], 1)
    # The server's database is locked longer than its connection waits (30 s) while the task
    # completes: the handlers of its reports fail with "database is locked" and are retried.
    db = sqlite3.connect(shape.stack.data_dir / "tasks.db", timeout=5, isolation_level=None)
    try:
        db.execute("BEGIN EXCLUSIVE")
        time.sleep(35)
    finally:
        db.execute("ROLLBACK")
        db.close()

    [task] = check_every_task_ended(
        shape, "control handler failing once (database locked)", [task_id]
    ).values()
    assert "database is locked" in shape.log("server"), "the lock never made a handler fail"
    assert task["state"] == "done", task["error"]


@pytest.mark.timeout(500)
def test_one_process_of_the_two_process_box_stopped(shape: Shape, long_audio: Path) -> None:
    shape.ensure()
    ids = shape.submit(long_audio, long_audio)
    wait_running(shape, ids, 2, worker=shape.box_name)
    processes = shape.box_processes()
    assert len(processes) == 2, f"the box runs {len(processes)} worker processes"
    os.kill(processes[0], signal.SIGKILL)

    tasks = check_every_task_ended(shape, "one process of the two-process box killed", ids, timeout=400)
    assert all(t["state"] == "done" for t in tasks.values()), {i: t["error"] for i, t in tasks.items()}
    assert any(len(events(t, "started")) >= 2 for t in tasks.values()), "no task was delivered again"
    # The box keeps working: a task submitted now is transcribed on it.
    shape.wait_box_alive()
    [after] = shape.submit(SPEECH)
    [task] = check_every_task_ended(shape, "the box after losing a process", [after]).values()
    assert task["state"] == "done" and task["worker"] == shape.box_name, (task["worker"], task["error"])


@pytest.mark.timeout(500)
def test_the_server_stopped_longer_than_the_message_age_window(shape: Shape, docx_file: Path) -> None:
    shape.ensure()
    window = 5
    shape.restart_server(MORAG_MESSAGE_MAX_AGE_S=str(window))
    try:
        shape.wait_box_alive()
        ids = shape.submit(REPORT, docx_file, SPEECH)
        shape.stack.stop("server")
        url = shape.stack.env["MORAG_BROKER_URL"]

        # The CPU worker finishes its documents while the server is down: their reports wait in control.
        def reported() -> bool:
            return (
                queue_info(url, "cpu").get("messages", 1) == 0
                and queue_info(url, "control").get("messages", 0) >= 2
            )

        wait_for("the documents done and reported while the server is down", reported, 180, shape.stack, 1.0)
        time.sleep(window + 3)  # the reports outlive the window before anyone reads them
        shape.start_server()
        tasks = check_every_task_ended(shape, f"server down longer than the {window} s message window", ids)
        assert all(t["state"] == "done" for t in tasks.values()), {
            t["filename"]: t["error"] for t in tasks.values()
        }
    finally:
        shape.restart_server(MORAG_MESSAGE_MAX_AGE_S="")


@pytest.mark.timeout(400)
def test_a_server_killed_between_recording_a_task_and_publishing_it(shape: Shape, tmp_path: Path) -> None:
    shape.ensure(box=False)
    shape.stack.stop("server", signal.SIGKILL)
    from pipeline.config import load_settings
    from pipeline.services import build_services
    from pipeline.submission import SubmitOptions, record  # what submit does, up to publishing

    env = shape.stack.env
    settings = load_settings(
        data_dir=shape.stack.data_dir, secret_key=env["MORAG_SECRET_KEY"], broker_url=env["MORAG_BROKER_URL"]
    )
    upload = tmp_path / "upload"
    shutil.copy(REPORT, upload)
    data = upload.read_bytes()
    task = record(
        build_services(settings), upload, "report.html", hashlib.sha256(data).hexdigest(), len(data),
        SubmitOptions(), lambda: None,
    )  # fmt: skip
    shape.start_server()

    [ended] = check_every_task_ended(shape, "server killed between record and publish", [task.id]).values()
    assert ended["state"] == "done", ended["error"]
    assert events(ended, "published"), [e["event"] for e in ended["events"]]


@pytest.mark.timeout(400)
def test_a_three_hour_recording_on_the_cpu_queue(shape: Shape, tmp_path: Path) -> None:
    shape.ensure(box=False)
    if "box" in shape.stack.processes:
        shape.stop_box()  # no GPU worker: a transcription falls back to the CPU queue
    with shape.api as api:
        wait_for(
            "no live GPU worker",
            lambda: api.get("/api/v1/workers").json()["queues"].get("gpu", {}).get("live", 0) == 0,
        )
    minute, recording = tmp_path / "minute.ogg", tmp_path / "three-hours.ogg"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono", "-t", "60",
                    "-c:a", "libopus", "-b:a", "6k", "-y", str(minute)], check=True)  # fmt: skip
    subprocess.run(["ffmpeg", "-v", "error", "-stream_loop", "179", "-i", str(minute), "-c", "copy",
                    "-y", str(recording)], check=True)  # fmt: skip
    before = task_ids(shape)

    proc = shape.cli("submit", "--no-wait", "--json", str(recording), timeout=120)
    made = sorted(task_ids(shape) - before)
    if proc.returncode != 0:  # refused at once, with its reason on one line
        assert proc.returncode == 2, proc.stderr
        assert not made, "a refused file left a task"
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "three-hours.ogg" in lines[0], proc.stderr
        TALLY.append(f"3-hour recording on cpu: refused at submit, no task: {lines[0]}")
        return
    assert len(made) == 1, made
    try:
        shown = json.loads(proc.stdout)
        task = shape.task(made[0])
        assert task["id"] in json.dumps(shown), proc.stdout
        route = task["route"]
        if route["queue"] == "gpu":  # kept on the GPU queue, and the route says why
            assert any("cpu" in reason.lower() for reason in route["reasons"]), route
            assert shape.cli("cancel", task["id"]).returncode == 0
            check_every_task_ended(shape, "3-hour recording kept on gpu (then canceled)", made, canceled=True)
            return
        # On the CPU queue its time limit must cover the CPU estimate, or it times out four times.
        assert route["time_limit_s"] >= route["estimates"]["cpu_s"], (
            f"CPU estimate {route['estimates']['cpu_s']:.0f} s, time limit {route['time_limit_s']} s: {route}"
        )
        if task["kind"] == "split":  # cut into chunks: each must fit its own queue's limit
            cut = wait_for(
                "the recording cut into chunks",
                lambda: shape.task(made[0]).get("input", {}).get("chunks"),
                300,
                shape.stack,
            )
            assert len(cut) >= 2, cut
            for chunk in cut:
                part = shape.task(chunk["id"])["route"]
                assert part["time_limit_s"] >= part["estimates"][f"{part['queue']}_s"], (chunk, part)
            TALLY.append(f"3-hour recording on cpu: cut into {len(cut)} chunks, each within its limit")
            return  # transcribing 3 hours on the CPU would take the suite's time; canceled below
        [ended] = check_every_task_ended(shape, "3-hour recording on cpu", made, timeout=600).values()
        assert ended["state"] == "done", ended["error"]
    finally:
        if shape.task(made[0])["state"] not in FINAL:  # leave nothing running for the next fault
            shape.cli("cancel", made[0])
            wait_for(
                "the recording canceled", lambda: shape.task(made[0])["state"] in FINAL, 180, shape.stack
            )


@pytest.mark.timeout(600)
def test_the_gpu_box_killed_while_tasks_wait(shape: Shape, long_audio: Path) -> None:
    shape.ensure()
    ids = shape.submit(long_audio, long_audio, SPEECH, TALK, SPEECH)
    assert all(shape.task(i)["route"]["queue"] == "gpu" for i in ids), (
        "the transcriptions did not go to the box"
    )
    wait_running(shape, ids, 2, worker=shape.box_name)
    shape.kill_box()

    tasks = check_every_task_ended(shape, "GPU box killed while tasks wait", ids, timeout=480)
    assert all(t["state"] == "done" for t in tasks.values()), {i: t["error"] for i, t in tasks.items()}
    moved = [t for t in tasks.values() if events(t, "rerouted")]
    assert moved, "no task was moved to cpu"
    assert all(t["route"]["queue"] == "cpu" for t in moved)


@pytest.mark.timeout(600)
def test_grants_shorter_than_the_backlog(shape: Shape) -> None:
    shape.ensure()
    ttl = 60
    shape.restart_server(MORAG_GRANT_TTL_S=str(ttl))
    try:
        shape.wait_box_alive()
        shape.stop_box()
        ids = shape.submit(SPEECH, TALK, SPEECH, options=("--gpu", "require"))
        time.sleep(ttl + 5)  # the backlog outlives the grants issued at submit
        assert all(shape.task(i)["state"] == "queued" for i in ids)
        shape.start_box()
        tasks = check_every_task_ended(shape, f"grants ({ttl} s) shorter than the backlog", ids, timeout=400)
        assert all(t["state"] == "done" for t in tasks.values()), {i: t["error"] for i, t in tasks.items()}
        assert all(t["worker"] == shape.box_name for t in tasks.values())
    finally:
        shape.restart_server(MORAG_GRANT_TTL_S="")
