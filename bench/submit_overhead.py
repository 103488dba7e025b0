"""End-to-end wall time of ``morag-pipeline submit`` against faster-whisper called directly.

Starts the server and one GPU-queue worker (``dramatiq pipeline.actors.gpu``)
on a fresh vhost, submits the sample once to warm the worker's model, then
times R submits of the sample (upload, routing, queue, download, ffmpeg,
transcription, outputs, verification, result download). The baseline is
faster-whisper transcribing the same file in this process with its model
already loaded, and, for reference, a cold run (model load included).
Prints medians and the ratio pipeline / direct. Then, on the same stack, it
times ``pipeline.client`` submitting the sample and waiting for its task, once
following the server's event stream and once reading the task again and again
(as the CLI did before), and prints the ratio stream / polling and each one's
overhead over faster-whisper direct. Last, where the submits' seconds went: before
their task existed, queued, each stage the worker timed (``pipeline.timings``),
the rest of the run and after it, with the CLI's start-up alone for reference.

    .venv/bin/python -m bench.submit_overhead --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from pipeline import timings
from pipeline.processors import whisper
from tests.conftest import BIN, SAMPLES, fresh_vhost, open_stack


def direct(path: Path, rounds: int) -> tuple[float, list[float]]:
    """(cold seconds, warm seconds per round) of faster-whisper on ``path``."""
    from faster_whisper import WhisperModel

    started = time.perf_counter()
    model = WhisperModel(whisper.resolve_model("tiny.en"), device="cpu", compute_type="int8")
    segments, _ = model.transcribe(str(path), beam_size=5)
    list(segments)
    cold = time.perf_counter() - started
    warm = []
    for _ in range(rounds):
        started = time.perf_counter()
        segments, _ = model.transcribe(str(path), beam_size=5)
        list(segments)
        warm.append(time.perf_counter() - started)
    return cold, warm


def client_runs(stack: object, path: Path, rounds: int) -> dict[str, list[float]]:
    """Seconds per task of submit + wait + result through ``pipeline.client``, by way of waiting."""
    from pipeline.client import Client

    times: dict[str, list[float]] = {"stream": [], "polling": []}
    with Client(stack.url, api_key=stack.env["MORAG_API_KEY"]) as client:  # type: ignore[attr-defined]
        for _ in range(rounds):
            for way in ("stream", "polling"):  # interleaved: both see the same machine
                started = time.perf_counter()
                task = client.submit(path)
                final = task.wait(timeout=600, stream=way == "stream")
                task.result("txt")
                times[way].append(time.perf_counter() - started)
                if final["state"] != "done":
                    raise RuntimeError(f"{way}: task {final['state']}: {final.get('error')}")
    return times


def breakdown(task: dict, began: float, ended: float) -> dict[str, float]:
    """Where one ``submit``'s seconds went, from its task's record and timings (server and bench
    share a clock): before the task exists, queued, each worker stage, the rest of the run, after."""
    started = [e["ts"] for e in task["events"] if e["event"] == "started"][-1]
    parts = {"CLI start, upload, classify": task["created_at"] - began}
    parts["queued"] = started - task["created_at"]
    found = timings.stages((task.get("result") or {}).get("timings") or {})
    parts.update((f"worker: {name}", seconds) for name, seconds in found)
    parts["worker: rest (manifest, completion)"] = task["finished_at"] - started - sum(s for _, s in found)
    parts["result download, CLI exit"] = ended - task["finished_at"]
    return parts


def pipeline_runs(
    path: Path, rounds: int
) -> tuple[list[float], dict[str, list[float]], list[dict[str, float]]]:
    with fresh_vhost() as url, tempfile.TemporaryDirectory() as tmp, open_stack(Path(tmp), url) as stack:
        stack.env["MORAG_PROGRESS_INTERVAL_S"] = "1.0"
        stack.start_server()
        stack.start_worker("gpu")
        stack.wait_consumers("gpu")
        stack.cli("submit", str(path))  # warm the worker's model
        times, spans = [], []
        for _ in range(rounds):
            began, started = time.time(), time.perf_counter()
            proc = stack.cli("submit", str(path))
            times.append(time.perf_counter() - started)
            spans.append((began, time.time()))
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr)
        listed = stack.get("/api/v1/tasks", params={"limit": rounds}).json()["tasks"]
        parts = []
        for task, (began, ended) in zip(sorted(listed, key=lambda t: t["created_at"]), spans, strict=True):
            full = stack.get(f"/api/v1/tasks/{task['id']}").json()
            parts.append(breakdown(full, began, ended))
        return times, client_runs(stack, path, rounds), parts


def cli_start(rounds: int) -> float:
    """Median seconds of ``morag-pipeline --help``: the CLI's start-up alone."""
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        subprocess.run([str(BIN / "morag-pipeline"), "--help"], capture_output=True, check=True)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--file", type=Path, default=SAMPLES / "talk.mp4")
    args = parser.parse_args()
    cold, warm = direct(args.file, args.rounds)
    ours, ways, parts = pipeline_runs(args.file, args.rounds)
    d, p = statistics.median(warm), statistics.median(ours)
    print(f"{args.file.name}, median of {args.rounds} rounds")
    print(f"  faster-whisper direct, model loaded   {d:6.2f} s")
    print(f"  faster-whisper direct, cold (load)    {cold:6.2f} s")
    print(f"  morag-pipeline submit, worker warm    {p:6.2f} s  (CLI start, upload, queue, ffmpeg, outputs)")
    print(f"  ratio submit / direct warm: {p / d:.2f}; overhead {p - d:.2f} s")
    s, q = statistics.median(ways["stream"]), statistics.median(ways["polling"])
    print(f"  client submit+wait+result, stream     {s:6.2f} s  (overhead {s - d:.2f} s)")
    print(f"  client submit+wait+result, polling    {q:6.2f} s  (overhead {q - d:.2f} s)")
    print(f"  ratio stream / polling: {s / q:.2f}; overhead change {(s - d) - (q - d):+.2f} s per task")
    print(f"where a submit's {p:.2f} s go (medians; the stages from the task's timings):")
    for name in parts[0]:
        print(f"  {name:<36} {statistics.median(part.get(name, 0.0) for part in parts):6.3f} s")
    print(f"  (the CLI's start-up alone, --help: {cli_start(args.rounds):.3f} s)")


if __name__ == "__main__":
    main()
