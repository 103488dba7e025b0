"""A GPU-queue worker streams: it holds one message more than its transcription slots, downloads
and decodes the next task while the model transcribes, warms its model up at boot, and runs one
transcription fewer after a CUDA out-of-memory error (docs/worker-sizing.md, "Slots, prefetch and
warm-up"). Real RabbitMQ, real server, real tiny.en on the CPU (the machines have no GPU).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.client import Client
from tests.conftest import ROOT, Stack, queue_depth, wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def log_lines(stack: Stack, name: str) -> list[dict[str, Any]]:
    lines = []
    for line in stack.log(name).splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


def logged(stack: Stack, name: str, message: str) -> list[dict[str, Any]]:
    return [line for line in log_lines(stack, name) if line.get("msg") == message]


def client(stack: Stack) -> Client:
    return Client(stack.url, api_key=stack.env["MORAG_API_KEY"])


def test_a_gpu_worker_holds_one_message_more_than_it_transcribes_and_decodes_the_next_meanwhile(
    stack: Stack, samples: Path
) -> None:
    stack.env["MORAG_HEARTBEAT_INTERVAL"] = "0.2"
    stack.start_server()
    stack.start_worker("gpu", threads=2, MORAG_WHISPER_DEVICE="cpu", MORAG_WHISPER_WARMUP="true")
    stack.wait_consumers("gpu")
    [warmed] = wait_for("the warm-up", lambda: logged(stack, "gpu-worker", "whisper model warmed up"), 120,
                        stack=stack)  # fmt: skip
    assert warmed["model"] == "tiny.en" and warmed["load_s"] > 0 and warmed["transcribe_s"] >= 0
    [sized] = logged(stack, "gpu-worker", "transcription slots")
    assert (sized["slots"], sized["prefetch"]) == (1, 2)

    count = 6
    with client(stack) as c:
        records = {r["id"]: r for r in (c.submit_record(samples / "speech.mp3") for _ in range(count))}
        held: list[tuple[int, int]] = []  # (tasks the worker's heartbeat holds, messages waiting)

        def watch_held() -> bool:
            worker = c.worker("gpu-worker")
            ready = queue_depth(stack.env["MORAG_BROKER_URL"], "gpu")
            held.append((len(worker.get("current") or []), ready))
            return all(c.task(t)["state"] in ("done", "failed") for t in records)

        wait_for("every task ended", watch_held, 300, stack=stack, interval=0.1)
        tasks = [c.task(t) for t in records]
    assert [t["state"] for t in tasks] == ["done"] * count, [t.get("error") for t in tasks]
    # Never more than two held (one transcribing, one prepared): a later urgent task still overtakes
    # the rest; and two at once while others waited.
    assert max(h for h, _ in held) == 2, held
    assert any(h == 2 and ready > 0 for h, ready in held), held

    results = sorted((t["result"] for t in tasks), key=lambda r: r["clock"]["model_started"])
    assert results[0]["timings"]["load_s"] < 0.05  # the first task found the model warm
    for before, after in zip(results, results[1:], strict=False):
        # The next task was decoded while the one before it transcribed, then waited for the slot;
        # the model's work never overlaps (one slot).
        assert after["clock"]["decode_ended"] < before["clock"]["model_ended"], (before, after)
        assert after["clock"]["model_started"] >= before["clock"]["model_ended"] - 0.01
    assert sum(r["timings"]["slot_s"] > 0 for r in results[1:]) >= count - 2


def test_out_of_memory_with_two_slots_retries_on_gpu_with_one_and_the_worker_keeps_working(
    stack: Stack, samples: Path
) -> None:
    stack.env["MORAG_HEARTBEAT_INTERVAL"] = "0.2"
    stack.start_server()
    stack.start_worker("gpu", threads=3, modules=("tests.integration.oom_once",), MORAG_WHISPER_DEVICE="cpu",
                       MORAG_WHISPER_CONCURRENCY="2", MORAG_WHISPER_WARMUP="true")  # fmt: skip
    stack.wait_consumers("gpu")
    wait_for("the warm-up", lambda: logged(stack, "gpu-worker", "whisper model warmed up"), 120, stack=stack)
    with client(stack) as c:
        first = c.submit(samples / "speech.mp3").wait(timeout=300)
        assert first["state"] == "done", first.get("error")
        record = c.task(first["id"])
        second = c.submit(samples / "speech.mp3").wait(timeout=300)
        assert second["state"] == "done", second.get("error")

        def counted() -> dict[str, Any] | None:
            worker = c.worker("gpu-worker")
            return (
                worker
                if worker["done"] == 2 and worker["hardware"].get("slots", {}).get("slots") == 1
                else None
            )

        worker = wait_for("a beat with one slot and both tasks done", counted, 30, stack=stack)
    events = [e["event"] for e in record["events"]]
    assert "retrying" in events and "rerouted" not in events, events
    assert (record["result"]["queue"], record["result"]["attempt"]) == ("gpu", 2)  # not moved to cpu
    assert record["result"]["segments"] > 0
    assert logged(stack, "gpu-worker", "GPU out of memory: one transcription slot fewer")[0]["slots"] == 1
    assert worker["state"] == "alive" and worker["failed"] == 1  # the attempt that ran out of memory
    assert stack.processes["gpu-worker"].poll() is None
    shown = stack.cli("workers", "gpu-worker", PYTHONPATH=str(ROOT))  # this checkout's CLI
    assert shown.returncode == 0, shown.stderr
    assert "slots:     1 transcription(s) at once, 0 running" in shown.stdout, shown.stdout
    assert time.time() - worker["last_seen"] < 30


def test_a_task_prepared_behind_a_transcription_is_canceled_without_waiting_for_it(
    stack: Stack, samples: Path, tmp_path: Path
) -> None:
    """A GPU worker's second thread holds the next task, decoded, until the model is free; a
    cancel of that task ends it then and there, not when the transcription before it ends."""
    from tests.conftest import looped_speech

    stack.start_server()
    stack.start_worker("gpu", threads=2, MORAG_WHISPER_DEVICE="cpu")
    stack.wait_consumers("gpu")
    long = looped_speech(tmp_path / "long.mp3", 11)  # two minutes of speech
    with client(stack) as c:
        first = c.submit_record(long)
        wait_for("the long task transcribing",
                 lambda: (c.task(first["id"]).get("progress") or {}).get("stage") == "transcribing", 120,
                 stack=stack)  # fmt: skip
        second = c.submit_record(samples / "speech.mp3")
        wait_for("the next task decoded, waiting for the model",
                 lambda: (c.task(second["id"]).get("progress") or {}).get("stage") == "waiting for the model",
                 60, stack=stack)  # fmt: skip
        c.cancel(second["id"], "not needed")

        def stopped() -> dict[str, Any] | None:
            events = c.task(second["id"])["events"]
            return next((e for e in events if e["event"] == "stopped"), None)

        # The worker stops it (the server marks it canceled at once, whatever the worker does).
        event = wait_for("the worker stopping the waiting task", stopped, 30, stack=stack)
        still = c.task(first["id"])
        c.cancel(first["id"])
    assert event["detail"]["reason"] == "canceled while waiting for the model", event
    assert still["state"] == "running", still  # the transcription before it had not ended
