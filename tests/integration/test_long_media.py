"""A long recording across the fleet, on a real stack: cut in silences by a CPU worker, its chunks
transcribed by two workers at once, one transcript stitched; canceling it cancels its chunks."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.outputs import output_name
from pipeline.processors.transcripts import FORMATS
from tests.conftest import SAMPLES, Stack, looped_speech, open_stack, wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

#: Over 20 s a recording is cut, in chunks of about 10 s (the sample lasts about 9 s).
SPLIT = {"MORAG_SPLIT_OVER_S": "20", "MORAG_SPLIT_CHUNK_S": "10"}
LOOPS = 5  # the sample six times over: about 55 s


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


@pytest.fixture
def fleet(tmp_path: Path, vhost: str, request: pytest.FixtureRequest) -> Iterator[Stack]:
    with open_stack(tmp_path, vhost, request, env=SPLIT) as stack:
        stack.start_server()
        stack.start_worker("cpu", name="cpu-a")
        stack.start_worker("cpu", name="cpu-b")
        stack.wait_consumers("cpu", 2)
        yield stack


def test_a_long_recording_is_split_across_two_workers_and_stitched(fleet: Stack, tmp_path: Path) -> None:
    once = fleet.cli("submit", "--json", str(SAMPLES / "speech.mp3"))
    assert once.returncode == 0, once.stderr
    sample = json.loads(once.stdout)
    assert sample["kind"] == "transcribe" and "chunks" not in sample["input"]  # 9 s: not cut
    recording = looped_speech(tmp_path / "long.mp3", LOOPS)
    out = tmp_path / "out"
    proc = fleet.cli("submit", "--json", str(recording), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    task = json.loads(proc.stdout)
    assert task["state"] == "done", task.get("error")
    assert task["kind"] == "transcribe"

    chunks = task["input"]["chunks"]
    assert len(chunks) >= 3
    assert chunks[0]["start"] == 0.0 and chunks[-1]["end"] == pytest.approx(55.0, abs=1.0)
    assert all(a["end"] == b["start"] for a, b in zip(chunks, chunks[1:], strict=False))
    # Both workers transcribed chunks of the one file.
    assert task["result"]["workers"] == ["cpu-a", "cpu-b"]
    assert {c["worker"] for c in task["result"]["chunks"]} == {"cpu-a", "cpu-b"}

    # Every word of the sample, six times, in order: nothing lost or doubled at the cuts.
    expected = _words(sample["text"])
    heard = _words(task["text"])
    assert len(heard) == pytest.approx(len(expected) * (LOOPS + 1), abs=LOOPS + 1), heard
    position = 0
    for _ in range(LOOPS + 1):
        for word in ("remote", "workers", "recordings", "graphics", "card"):
            position = heard.index(word, position) + 1
    # Times run on across the cuts, to the millisecond, in every format.
    transcript = json.loads((out / "long.json").read_text())
    starts = [s["start"] for s in transcript["segments"]]
    assert starts == sorted(starts)
    for chunk in chunks:  # each chunk's segments where its slice of the recording is
        assert any(chunk["start"] <= start < chunk["end"] for start in starts), chunk
    assert all(round(s, 3) == s for s in starts)
    assert transcript["duration"] == pytest.approx(55.0, abs=1.0)
    assert sorted(p.name for p in out.iterdir()) == sorted(output_name("long.mp3", f) for f in FORMATS)
    assert (out / "long.srt").read_text().startswith("1\n00:00:00,")

    # The chunks are the task's own business: listings show the task alone, status its chunks.
    listed = [t["id"] for t in fleet.get("/api/v1/tasks").json()["tasks"]]
    assert task["id"] in listed and not any(c["id"] in listed for c in chunks)
    status = fleet.cli("status", task["id"])
    assert status.returncode == 0, status.stderr
    assert "cut into" in status.stdout


def test_canceling_a_split_task_cancels_its_chunks(fleet: Stack, tmp_path: Path) -> None:
    recording = looped_speech(tmp_path / "long.mp3", LOOPS)
    proc = fleet.cli("submit", "--no-wait", str(recording))
    assert proc.returncode == 0, proc.stderr
    task_id = proc.stdout.split()[-1]

    def cut() -> dict | None:
        task = fleet.get(f"/api/v1/tasks/{task_id}").json()
        return task if task["input"].get("chunks") else None

    task = wait_for("the recording cut into chunks", cut, timeout=60)
    canceled = fleet.post(f"/api/v1/tasks/{task_id}/cancel", json={"reason": "wrong file"})
    assert canceled.status_code == 200, canceled.text
    assert canceled.json()["state"] == "canceled"
    states = {c["id"]: fleet.get(f"/api/v1/tasks/{c['id']}").json() for c in task["input"]["chunks"]}
    # Every chunk not done yet is canceled with its task, and says why.
    assert {t["state"] for t in states.values()} <= {"canceled", "done"}
    stopped = [t for t in states.values() if t["state"] == "canceled"]
    assert stopped and all("its task was canceled: wrong file" in t["error"] for t in stopped)


def test_a_gpu_worker_and_a_cpu_worker_share_the_chunks(
    tmp_path: Path, vhost: str, request: pytest.FixtureRequest
) -> None:
    with open_stack(tmp_path, vhost, request, env=SPLIT) as stack:
        stack.start_server()
        stack.start_worker("gpu")
        stack.start_worker("cpu")
        stack.wait_consumers("gpu")
        stack.wait_consumers("cpu")
        recording = looped_speech(tmp_path / "long.mp3", LOOPS)
        proc = stack.cli("submit", "--json", str(recording))
        assert proc.returncode == 0, proc.stderr
        task = json.loads(proc.stdout)
        assert task["state"] == "done", task.get("error")
        assert task["result"]["workers"] == ["cpu-worker", "gpu-worker"]
        chunks = [stack.get(f"/api/v1/tasks/{c['id']}").json() for c in task["input"]["chunks"]]
        assert {c["route"]["queue"] for c in chunks} == {"gpu", "cpu"}
        # The first chunks go to the idle GPU worker; the rest spill to CPU by load.
        assert chunks[0]["route"]["queue"] == "gpu"
        assert any("GPU queue busy" in c["route"]["reasons"][0] for c in chunks), [c["route"] for c in chunks]
