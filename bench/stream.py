"""N short clips submitted at once through the stack against a faster-whisper loop in one process.

Starts the server on a fresh vhost and, each round, one GPU-queue worker
(``dramatiq pipeline.actors.gpu --queues gpu``, one process, on the CPU, the
same tiny.en at int8 and beam 5 as the baseline) twice: with 2 threads (one
transcription slot, one message more: the next clip is downloaded and decoded
while one transcribes) and with 1 thread (one message at a time, as workers ran
before). Each waits for its warm-up, then N clips are submitted from this
process with ``pipeline.client`` and followed until every task ended. The
baseline, measured in the same round on the same cores, is faster-whisper
transcribing the same clip N times in a loop with its model loaded, with the
worker's CPU threads (its cores, for one transcription at a time); the same
loop with CTranslate2's default thread count is printed beside it.

Prints medians over the rounds: each way's wall time (first submit to last
task ended; the loop's own for the baseline), the ratio stack / direct, and the
transcriber's busy fraction: the tasks' ``transcribe_s`` summed over the time
from the first task's start to the last one's end.

    .venv/bin/python -m bench.stream --clips 20 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.processors import whisper
from tests.conftest import SAMPLES, Stack, fresh_vhost, open_stack, wait_for

#: The worker's stages quoted per task (pipeline.timings).
STAGES = ("download", "decode", "slot", "load", "transcribe", "render", "upload")
#: The worker's ways: label, threads.
WAYS = (("2 threads (streaming)", 2), ("1 thread (one at a time)", 1))


def direct(path: Path, clips: int, cpu_threads: int = 0) -> dict[str, float]:
    """Wall and CPU seconds of faster-whisper transcribing ``path`` ``clips`` times, model loaded
    (and warmed, as the worker's is), with ``cpu_threads`` CTranslate2 threads (0: its default)."""
    from faster_whisper import WhisperModel

    model = WhisperModel(
        whisper.resolve_model("tiny.en"), device="cpu", compute_type="int8", cpu_threads=cpu_threads
    )
    list(model.transcribe(str(path), beam_size=5)[0])
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(clips):
        segments, _ = model.transcribe(str(path), beam_size=5)
        list(segments)
    return {"wall": time.perf_counter() - started, "cpu": time.process_time() - cpu}


def tree_cpu(pid: int) -> float:
    """CPU seconds of process ``pid`` and its live descendants, with the children they reaped
    (ffmpeg, ffprobe): Linux /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(f) for f in fields[11:15]) / tick  # utime, stime, cutime, cstime
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return total
    return total + sum(tree_cpu(int(child)) for child in children)


def stack_cpu(stack: Stack, worker: str) -> tuple[float, float]:
    """CPU seconds the server and ``worker`` (every process of each) have used so far."""
    return tree_cpu(stack.processes["server"].pid), tree_cpu(stack.processes[worker].pid)


def warmed(stack: Stack, name: str) -> bool:
    for line in stack.log(name).splitlines():
        try:
            if json.loads(line).get("msg") == "whisper model warmed up":
                return True
        except ValueError:
            continue
    return False


def through_stack(stack: Stack, path: Path, clips: int, threads: int, name: str) -> dict[str, float]:
    """Wall seconds and busy fraction of ``clips`` tasks on a fresh worker with ``threads``."""
    from pipeline.client import Client

    warm = {"MORAG_WHISPER_DEVICE": "cpu", "MORAG_WHISPER_WARMUP": "true"}
    stack.start_worker("gpu", name=name, threads=threads, **warm)
    try:
        wait_for(f"{name}'s warm-up", lambda: warmed(stack, name), 120, stack=stack)
        with Client(stack.url, api_key=stack.env["MORAG_API_KEY"]) as client:
            cpu, started = stack_cpu(stack, name), time.perf_counter()
            records = {r["id"]: r for r in (client.submit_record(path) for _ in range(clips))}
            final = client.watch(records).run(timeout=1800)
            wall, (server, worker) = time.perf_counter() - started, stack_cpu(stack, name)
            tasks = [client.task(task_id) for task_id in final]
    finally:
        stack.stop(name)
    failed = [t for t in tasks if t["state"] != "done"]
    if failed:
        raise RuntimeError(f"{len(failed)} task(s) not done: {failed[0].get('error')}")
    stages = {
        name: statistics.median(t["result"]["timings"].get(f"{name}_s", 0.0) for t in tasks)
        for name in STAGES
    }
    server, worker = server - cpu[0], worker - cpu[1]
    return {"wall": wall, "cpu": server + worker, "server_cpu": server, "worker_cpu": worker,
            "busy": busy_fraction(tasks), **stages}  # fmt: skip


def busy_fraction(tasks: list[dict[str, Any]]) -> float:
    """The tasks' transcription seconds over the time from the first start to the last end."""
    first = min(t["started_at"] for t in tasks)
    last = max(t["finished_at"] for t in tasks)
    return sum(t["result"]["timings"]["transcribe_s"] for t in tasks) / (last - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--file", type=Path, default=SAMPLES / "speech.mp3")
    args = parser.parse_args()
    direct_s: list[dict[str, float]] = []
    ways: dict[str, list[dict[str, float]]] = {label: [] for label, _ in WAYS}
    # The baseline runs with the worker's CPU threads (one transcription at a time: every core),
    # so that the ratio is the stack's alone; the library's default threads are shown beside it.
    cpu_threads, default_s = whisper.cpu_threads_for(whisper.available_cores(), 1), []
    with fresh_vhost() as url, tempfile.TemporaryDirectory() as tmp, open_stack(Path(tmp), url) as stack:
        stack.start_server()
        for round_ in range(args.rounds):
            direct_s.append(direct(args.file, args.clips, cpu_threads))
            default_s.append(direct(args.file, args.clips))
            for label, threads in WAYS:
                name = f"gpu-{threads}t-{round_}"
                ways[label].append(through_stack(stack, args.file, args.clips, threads, name))
    d = statistics.median(r["wall"] for r in direct_s)
    d_cpu = statistics.median(r["cpu"] for r in direct_s)
    print(f"{args.clips} x {args.file.name}, tiny.en int8 beam 5 on the CPU, median of {args.rounds} rounds")
    per_clip = d / args.clips
    print(f"  faster-whisper direct loop, one process  {d:7.2f} s   ({per_clip:.2f} s per clip,"
          f" CPU {d_cpu:.1f} s; {cpu_threads} CPU threads, as the worker)")  # fmt: skip
    default = statistics.median(r["wall"] for r in default_s)
    print(f"  the same loop, CTranslate2's own threads {default:7.2f} s   ({default / args.clips:.2f} s"
          " per clip)")  # fmt: skip
    for label, _ in WAYS:
        runs = ways[label]
        wall = statistics.median(r["wall"] for r in runs)
        busy = statistics.median(r["busy"] for r in runs)
        ratio = statistics.median(r["wall"] / s["wall"] for r, s in zip(runs, direct_s, strict=True))
        cpu = statistics.median(r["cpu"] / s["cpu"] for r, s in zip(runs, direct_s, strict=True))
        print(f"  stack, worker {label:<26} {wall:7.2f} s   ratio stack/direct {ratio:.2f}   busy {busy:.0%}"
              f"   CPU ratio {cpu:.2f}")  # fmt: skip
        per_task = ", ".join(f"{n} {statistics.median(r[n] for r in runs):.2f}" for n in STAGES)
        print(f"    per task, s: {per_task}")
        server = statistics.median(r["server_cpu"] for r in runs)
        worker = statistics.median(r["worker_cpu"] for r in runs)
        print(f"    CPU, s: worker {worker:.1f}, server {server:.1f}")
    streaming = ways[WAYS[0][0]]
    ratio = statistics.median(r["wall"] / s["wall"] for r, s in zip(streaming, direct_s, strict=True))
    busy = statistics.median(r["busy"] for r in streaming)
    print(f"  ratio stack/direct: {ratio:.2f} (goal at most 1.10); transcriber busy {busy:.0%}")


if __name__ == "__main__":
    main()
