"""The pipeline on a real RabbitMQ, with server and workers started as users start them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.outputs import output_name
from pipeline.processors.transcripts import FORMATS
from tests.conftest import SPOKEN_WORDS, Stack, queue_depth

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


@pytest.fixture
def running(stack: Stack) -> Stack:
    stack.start_server()
    stack.start_worker("gpu")
    stack.start_worker("cpu", threads=2)
    stack.wait_consumers("gpu")
    stack.wait_consumers("cpu")
    return stack


def submit_json(stack: Stack, *args: str) -> list[dict]:
    proc = stack.cli("submit", "--json", *args)
    assert proc.returncode in (0, 1), proc.stderr
    data = json.loads(proc.stdout)
    return data if isinstance(data, list) else [data]


def test_video_audio_and_documents_come_back(running: Stack, samples: Path, docx_file: Path) -> None:
    tasks = submit_json(
        running, str(samples / "talk.mp4"), str(samples / "speech.mp3"),
        str(samples / "report.html"), str(docx_file),
    )  # fmt: skip
    by_name = {t["filename"]: t for t in tasks}
    assert {t["state"] for t in tasks} == {"done"}, [t.get("error") for t in tasks]

    for name in ("talk.mp4", "speech.mp3"):
        task = by_name[name]
        text = task["text"].lower()
        for word in SPOKEN_WORDS:
            assert word in text, f"{name}: {word!r} not in {text!r}"
        assert task["route"]["queue"] == "gpu"
        assert task["worker"] == "gpu-worker"
        assert {o["format"] for o in task["outputs"]} == {"json", "srt", "vtt", "txt", "md", "morag"}
        assert task["result"]["model"] == "tiny.en"
    assert by_name["talk.mp4"]["input"]["media"]["format"] == "video"
    assert by_name["speech.mp3"]["input"]["media"]["format"] == "audio"

    html = by_name["report.html"]["text"]
    assert "# Quarterly ingestion report" in html
    assert "## Volumes by kind" in html
    assert "| Audio" in html and "1200" in html
    docx = by_name["budget.docx"]["text"]
    assert "Budget review" in docx
    assert "| GPU hours" in docx and "420" in docx
    for name in ("report.html", "budget.docx"):
        assert by_name[name]["route"]["queue"] == "cpu"
        assert by_name[name]["worker"] == "cpu-worker"
        assert {o["format"] for o in by_name[name]["outputs"]} == {"md", "json"}


def test_output_dir_gets_every_format_and_status_shows_route(
    running: Stack, samples: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    proc = running.cli("submit", str(samples / "talk.mp4"), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(output_name("talk.mp4", f) for f in FORMATS)
    transcript = json.loads((out / "talk.json").read_text())
    assert transcript["language"] == "en"
    assert transcript["segments"] and all(s["end"] > s["start"] for s in transcript["segments"])
    assert {"load_s", "transcribe_s"} <= set(transcript["timings"])
    assert (out / "talk.srt").read_text().startswith("1\n00:00:00,000 --> ")
    assert (out / "talk.vtt").read_text().startswith("WEBVTT")

    listing = running.get("/api/v1/tasks").json()
    task_id = listing["tasks"][0]["id"]
    status = running.cli("status", task_id)
    assert status.returncode == 0
    assert "queue gpu" in status.stdout
    assert "GPU worker(s) connected" in status.stdout
    for event in ("submitted", "published", "started", "done"):
        assert event in status.stdout

    # Every stage of the run is timed, and the stages fit in the task's running time.
    task = running.get(f"/api/v1/tasks/{task_id}").json()
    timings = task["result"]["timings"]
    stages = ("download", "decode", "load", "transcribe", "render", "upload", "manifest", "report")
    assert {f"{stage}_s" for stage in stages} <= set(timings), timings
    assert "probe_s" not in timings  # the server's probe gave the duration: ffprobe ran once
    assert all(seconds >= 0 for seconds in timings.values())
    started = [e["ts"] for e in task["events"] if e["event"] == "started"][-1]
    assert sum(timings.values()) <= task["finished_at"] - started
    line = next(line for line in status.stdout.splitlines() if line.strip().startswith("timings:"))
    for stage in stages:
        assert f"{stage} {timings[stage + '_s']:.2f} s" in line, line
    assert line.index("download") < line.index("decode") < line.index("transcribe") < line.index("upload")
    assert f"of {task['finished_at'] - started:.2f} s running" in line


def test_content_decides_not_the_name(running: Stack, samples: Path, tmp_path: Path) -> None:
    disguised = tmp_path / "notes.txt"
    shutil.copy(samples / "talk.mp4", disguised)
    [task] = submit_json(running, str(disguised))
    assert task["state"] == "done"
    assert task["kind"] == "transcribe"
    assert all(word in task["text"].lower() for word in SPOKEN_WORDS), task["text"]
    assert any("content wins" in r for r in task["route"]["reasons"])

    fake = tmp_path / "holiday.mp4"
    fake.write_text("just some text, not a video\n")
    proc = running.cli("submit", str(fake))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "plain text" in proc.stderr and ".mp4" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_corrupt_media_fails_once_with_reason(running: Stack, corrupt_mp4: Path) -> None:
    proc = running.cli("submit", str(corrupt_mp4))
    assert proc.returncode == 1
    assert "cannot decode audio" in proc.stderr
    task = running.get("/api/v1/tasks").json()["tasks"][0]
    assert task["state"] == "failed"
    assert task["attempts"] == 1
    events = running.get(f"/api/v1/tasks/{task['id']}").json()["events"]
    assert [e["event"] for e in events].count("started") == 1
    assert "retrying" not in [e["event"] for e in events]
    # Failed for good: the message sits in the dead letters, not in a retry loop.
    assert queue_depth(running.env["MORAG_BROKER_URL"], "gpu.XQ") == 1


def test_result_before_done_and_unknown_task(running: Stack) -> None:
    proc = running.cli("status", "0" * 32)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"morag-pipeline: no task {'0' * 32}"


def test_urgent_overtakes_low_on_a_busy_worker(stack: Stack, samples: Path, long_audio: Path) -> None:
    stack.start_server()
    # On the CPU also where a GPU is: the first task must keep the worker busy while the others queue.
    stack.start_worker("gpu", MORAG_WHISPER_DEVICE="cpu")
    stack.wait_consumers("gpu")
    first = submit_no_wait(stack, long_audio, "normal")
    wait_state(stack, first, "running")
    lows = [submit_no_wait(stack, samples / "speech.mp3", "low") for _ in range(3)]
    urgent = submit_no_wait(stack, samples / "speech.mp3", "urgent")
    # The others queued while the first ran (on a loaded machine four submits can outlast it);
    # canceled now, it frees the worker for the most urgent of them.
    assert stack.get(f"/api/v1/tasks/{first}").json()["state"] == "running", "the first task ended too soon"
    assert stack.cli("cancel", first).returncode == 0
    wait_state(stack, first, "canceled")
    tasks = {tid: wait_state(stack, tid, "done") for tid in [*lows, urgent]}
    started = sorted(tasks, key=lambda tid: tasks[tid]["started_at"])
    assert started[0] == urgent, [tasks[t]["options"]["priority"] for t in started]
    assert tasks[urgent]["route"]["broker_priority"] > tasks[lows[0]]["route"]["broker_priority"]


def submit_no_wait(stack: Stack, path: Path, priority: str) -> str:
    proc = stack.cli("submit", "--no-wait", "--priority", priority, str(path))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def wait_state(stack: Stack, task_id: str, state: str, timeout: float = 120) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = stack.get(f"/api/v1/tasks/{task_id}").json()
        if task["state"] == state:
            return task
        assert task["state"] not in {"failed", "canceled"}, task
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} never reached {state}:\n{stack.all_logs()}")
