"""End-to-end wall time of ``morag-pipeline submit`` against faster-whisper called directly.

Starts the server and one GPU-queue worker (``dramatiq pipeline.actors.gpu``)
on a fresh vhost, submits the sample once to warm the worker's model, then
times R submits of the sample (upload, routing, queue, download, ffmpeg,
transcription, outputs, verification, result download). The baseline is
faster-whisper transcribing the same file in this process with its model
already loaded, and, for reference, a cold run (model load included).
Prints medians and the ratio pipeline / direct.

    .venv/bin/python -m bench.submit_overhead --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from pipeline.processors import whisper
from tests.conftest import SAMPLES, fresh_vhost, open_stack


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


def pipeline_runs(path: Path, rounds: int) -> list[float]:
    with fresh_vhost() as url, tempfile.TemporaryDirectory() as tmp, open_stack(Path(tmp), url) as stack:
        stack.env["MORAG_PROGRESS_INTERVAL_S"] = "1.0"
        stack.start_server()
        stack.start_worker("gpu")
        stack.wait_consumers("gpu")
        stack.cli("submit", str(path))  # warm the worker's model
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            proc = stack.cli("submit", str(path))
            times.append(time.perf_counter() - started)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr)
        return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--file", type=Path, default=SAMPLES / "talk.mp4")
    args = parser.parse_args()
    cold, warm = direct(args.file, args.rounds)
    ours = pipeline_runs(args.file, args.rounds)
    d, p = statistics.median(warm), statistics.median(ours)
    print(f"{args.file.name}, median of {args.rounds} rounds")
    print(f"  faster-whisper direct, model loaded   {d:6.2f} s")
    print(f"  faster-whisper direct, cold (load)    {cold:6.2f} s")
    print(f"  morag-pipeline submit, worker warm    {p:6.2f} s  (CLI start, upload, queue, ffmpeg, outputs)")
    print(f"  ratio submit / direct warm: {p / d:.2f}; overhead {p - d:.2f} s")


if __name__ == "__main__":
    main()
