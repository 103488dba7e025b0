"""Workers that die: killed in the middle of a task, or killed by their input every time."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from pipeline.outputs import output_name
from pipeline.processors.transcripts import FORMATS
from tests.chaos.conftest import events, submit, task, wait_consumers, wait_for
from tests.conftest import Stack, queue_depth

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def store_files(stack: Stack, task_id: str) -> list[str]:
    """Every file the task has in the server's store, relative to its folder."""
    folder = stack.data_dir / "files" / "tasks" / task_id
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.timeout(600)
def test_kill_9_mid_transcription_completes_elsewhere_once(stack: Stack, lasting_audio: Path) -> None:
    stack.env["MORAG_WHISPER_BEAM_SIZE"] = "1"  # greedy decoding: the whole file twice, faster
    stack.start_server()
    for name in ("gpu-a", "gpu-b"):  # on the CPU also where a GPU is: the transcription must last
        stack.start_worker("gpu", name, MORAG_WHISPER_DEVICE="cpu")
    wait_consumers(stack, "gpu", 2)

    task_id = submit(stack, lasting_audio)["id"]

    def transcribing() -> dict | None:
        t = task(stack, task_id)
        return t if t["progress"].get("stage") == "transcribing" and t["progress"]["percent"] > 0 else None

    victim = wait_for("the transcription to be under way", transcribing, stack=stack)["worker"]
    stack.stop(victim, signal.SIGKILL)
    survivor = ({"gpu-a", "gpu-b"} - {victim}).pop()

    # The survivor transcribes the whole file again; on two loaded cores that can take minutes.
    done = wait_for(
        "the task to finish", lambda: (t := task(stack, task_id))["state"] in {"done", "failed"} and t,
        timeout=420, stack=stack,
    )  # fmt: skip
    assert done["state"] == "done", done["error"]
    assert done["worker"] == survivor
    assert [e["detail"]["worker"] for e in events(done, "started")] == [victim, survivor]
    assert [e["detail"]["delivery"] for e in events(done, "redelivered")] == [2]
    assert len(events(done, "done")) == 1

    # One set of outputs: every format and the manifest, no partial file.
    names = sorted(output_name(lasting_audio.name, fmt) for fmt in FORMATS)
    assert store_files(stack, task_id) == [
        f"input/{lasting_audio.name}",
        "output/.manifest.json",
        *(f"output/{name}" for name in names),
    ]
    assert sorted(o["path"].rsplit("/", 1)[-1] for o in done["outputs"]) == names


def test_poison_file_is_dead_lettered_and_others_finish(stack: Stack, tmp_path: Path) -> None:
    """Both CPU workers die on the poison file; a supervisor restarts them, as systemd would."""
    max_deliveries = 3
    stack.env["MORAG_MAX_DELIVERIES"] = str(max_deliveries)
    stack.start_server()
    workers = ("cpu-a", "cpu-b")
    for name in workers:
        stack.start_worker("cpu", name, modules=("tests.chaos.crashing",))
    wait_consumers(stack, "cpu", 2)

    docs = tmp_path / "docs"
    docs.mkdir()
    poison = docs / "poison.md"
    poison.write_text("# This file kills the worker that takes it\n")
    poison_id = submit(stack, poison)["id"]
    healthy = []
    for n in range(8):
        path = docs / f"note-{n}.md"
        path.write_text(f"# Note {n}\n\nNothing wrong with this one.\n")
        healthy.append(submit(stack, path)["id"])

    crashes = 0

    def supervised(check):  # type: ignore[no-untyped-def]
        """``check``, after restarting any worker that died (counted)."""

        def step():  # type: ignore[no-untyped-def]
            nonlocal crashes
            for name in workers:
                if stack.processes[name].poll() is not None:
                    crashes += 1
                    stack.start_worker("cpu", name, modules=("tests.chaos.crashing",))
            return check()

        return step

    ended = supervised(lambda: (t := task(stack, poison_id))["state"] not in {"queued", "running"} and t)
    dead = wait_for("the poison task to end", ended, timeout=240, stack=stack)
    assert dead["state"] == "failed"
    assert f"delivered {max_deliveries} times" in dead["error"]
    assert "MORAG_MAX_DELIVERIES=3" in dead["error"]
    assert [e["detail"]["delivery"] for e in events(dead, "redelivered")] == [2, 3]

    assert queue_depth(stack.env["MORAG_BROKER_URL"], "cpu.XQ") == 1
    proc = stack.cli("dead", "list", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    [letter] = json.loads(proc.stdout)["letters"]
    assert letter["task_id"] == poison_id
    assert letter["deliveries"] == max_deliveries
    assert "the input may crash the worker" in letter["reason"]

    for task_id in healthy:
        done = supervised(lambda tid=task_id: (t := task(stack, tid))["state"] == "done" and t)
        t = wait_for(f"task {task_id} to be done", done, stack=stack)
        assert len(events(t, "done")) == 1
        # Not held up: never caught in a crash, never retried.
        assert not events(t, "redelivered") and not events(t, "retrying")

    # Each of the three deliveries killed a worker (a worker's parent process
    # exits a moment after its child); the fourth delivery was not run.
    wait_for("the third crash", supervised(lambda: crashes >= max_deliveries), timeout=30, stack=stack)
    assert crashes == max_deliveries


def test_redelivered_after_completion_is_not_run_again(stack: Stack, tmp_path: Path) -> None:
    """The worker dies after the task's outputs and completion, before its ack: the next
    delivery finds the task ended (the SFTP server closed its grant) and is acknowledged with a
    note, run no more and dead-lettered never."""
    stack.start_server()
    stack.start_worker("cpu", "cpu-a", modules=("tests.chaos.crashing",))
    wait_consumers(stack, "cpu")
    doc = tmp_path / "dies-before-ack.md"
    doc.write_text("# Finished, but never acknowledged\n")
    task_id = submit(stack, doc)["id"]

    wait_for("the worker to die", lambda: stack.processes["cpu-a"].poll() is not None, stack=stack)
    stack.start_worker("cpu", "cpu-b", modules=("tests.chaos.crashing",))
    reused = wait_for(
        "the redelivery to be handled", lambda: events(t := task(stack, task_id), "skipped") and t
    )
    assert reused["state"] == "done"
    assert reused["worker"] == "cpu-a"  # the run that counts is the first
    assert [e["detail"]["worker"] for e in events(reused, "started")] == ["cpu-a"]
    [again] = events(reused, "redelivered")
    assert again["detail"]["delivery"] == 2 and again["detail"]["worker"] == "cpu-b"
    [skipped] = events(reused, "skipped")
    assert skipped["detail"]["worker"] == "cpu-b" and "had already ended" in skipped["detail"]["reason"]
    assert len(events(reused, "done")) == 1
    assert "task already ended: nothing to do" in stack.log("cpu-b")
    assert "Finished converting" not in stack.log("cpu-b")  # docling never ran on cpu-b
    assert stack.get("/api/v1/dead").json()["letters"] == []
    assert store_files(stack, task_id) == [
        "input/dies-before-ack.md",
        "output/.manifest.json",
        "output/dies-before-ack.json",
        "output/dies-before-ack.md",
    ]
