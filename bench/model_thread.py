"""CPU transcription speed by the thread that made the model: one that ended, or the one that
transcribes.

A Dramatiq worker's threads live as long as the worker. Before models were made in a
thread of their own (``whisper.in_passing_thread``), the first task's thread made its
model and went on transcribing with it. This benchmark transcribes the same recording
R times in one long-lived thread, with the model made:

- ``own``: by that thread itself, ``WhisperModel(...)`` called directly (the baseline:
  how workers made it before);
- ``passing``: by ``whisper.load_model``, as workers make it now.

Each setup runs in a fresh process (what the thread does to CTranslate2 lasts for the
process), interleaved for ``--rounds`` rounds, at temperature 0 so that every run decodes
the same words. Prints the median seconds per transcription and the ratio passing / own.

    .venv/bin/python -m bench.model_thread --seconds 55 --runs 3 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.conftest import ROOT, looped_speech

MODEL = "tiny.en"
SETUPS = ("own", "passing")


def transcribe_in_one_thread(setup: str, audio: str, runs: int) -> list[float]:
    """Seconds of each of ``runs`` transcriptions of ``audio`` in one thread, the model made by
    ``setup``."""
    from pipeline.processors import whisper

    threads = whisper.cpu_threads_for(whisper.available_cores(), 1)
    seconds: list[float] = []

    def work() -> None:
        if setup == "own":
            from faster_whisper import WhisperModel

            model = WhisperModel(whisper.resolve_model(MODEL), device="cpu", compute_type="int8",
                                 cpu_threads=threads)  # fmt: skip
        else:
            model, _, _ = whisper.load_model(MODEL, "cpu", "int8", cpu_threads=threads)
        for _ in range(runs):
            started = time.perf_counter()
            pieces, _ = model.transcribe(audio, beam_size=5, language="en", temperature=0.0)
            list(pieces)
            seconds.append(time.perf_counter() - started)

    worker = threading.Thread(target=work)  # a worker thread: it lives on after its model is made
    worker.start()
    worker.join()
    return seconds


def run_setup(setup: str, audio: Path, runs: int) -> list[float]:
    """``transcribe_in_one_thread`` in a fresh process."""
    code = (
        "import json, sys; from bench.model_thread import transcribe_in_one_thread as t;"
        " print(json.dumps(t(sys.argv[1], sys.argv[2], int(sys.argv[3]))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, setup, str(audio), str(runs)],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=1800,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=55.0, help="the recording: the sample, looped")
    parser.add_argument("--runs", type=int, default=3, help="transcriptions per process")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        loops = max(0, round(args.seconds / 9.17) - 1)
        audio = looped_speech(Path(tmp) / "speech.mp3", loops)
        results: dict[str, list[float]] = {setup: [] for setup in SETUPS}
        for _ in range(args.rounds):
            for setup in SETUPS:
                results[setup].extend(run_setup(setup, audio, args.runs))
    print(
        f"{MODEL} on the CPU, {(loops + 1) * 9.17:.0f} s of speech, {args.runs} transcriptions in one thread"
        f" per process, median of {args.rounds} rounds"
    )
    medians = {setup: statistics.median(runs) for setup, runs in results.items()}
    print(f"  model made by the transcribing thread (own)   {medians['own']:6.2f} s")
    print(f"  model made by a thread that ended (passing)   {medians['passing']:6.2f} s")
    print(f"  ratio passing / own: {medians['passing'] / medians['own']:.2f}")


if __name__ == "__main__":
    main()
