"""One long recording, transcribed whole by one worker, then cut and spread over two workers.

Builds a recording of M minutes from the speech sample (looped, as
``tests/conftest.py::looped_speech`` does), then, in each round, times
``morag-pipeline submit`` of it on two stacks on fresh vhosts:

- the baseline: splitting off (``MORAG_SPLIT_OVER_S=0``) and one CPU worker,
  which transcribes the whole file as one task;
- split: ``MORAG_SPLIT_OVER_S`` and ``MORAG_SPLIT_CHUNK_S`` set to the chunk
  length, and W CPU workers: a worker finds the cuts, the chunks are
  transcribed by whichever worker is free, the server stitches them.

Each worker's model is warmed by a short submit before the timed one. Prints
the medians, the speed-up, the word error rate of the split transcript against the
whole one (words lower-cased, punctuation dropped; goal at most 1 %), and the
word error rate of each against the text the recording speaks (the sample's
text of ``samples/make_samples.sh``, as many times as it is looped). On a
machine with few cores the workers share them, so the speed-up is bounded by
the cores, not by the workers.

    .venv/bin/python -m bench.long_media --minutes 30 --chunk-s 300 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import tempfile
import time
from pathlib import Path

from tests.conftest import SAMPLES, fresh_vhost, looped_speech, open_stack

#: Seconds the speech sample lasts, about.
SAMPLE_S = 9.17


def spoken_words() -> list[str]:
    """The words samples/make_samples.sh gives espeak-ng: what the sample says."""
    script = (SAMPLES / "make_samples.sh").read_text()
    found = re.search(r'^text="([^"]+)"$', script, re.MULTILINE)
    if found is None:
        raise RuntimeError("samples/make_samples.sh sets no text")
    return words(found.group(1))


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def word_error_rate(reference: list[str], hypothesis: list[str]) -> float:
    """Word-level edit distance (substitutions, insertions, deletions) over the reference's length."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, 1):
        current = [i]
        for j, hyp in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref != hyp)))
        previous = current
    return previous[-1] / max(len(reference), 1)


def timed_run(recording: Path, workers: int, settings: dict[str, str]) -> tuple[float, dict]:
    """(seconds of submit until the transcript is back, the task) on a fresh stack."""
    with (
        fresh_vhost() as url,
        tempfile.TemporaryDirectory() as tmp,
        open_stack(Path(tmp), url, env=settings) as stack,
    ):
        stack.env["MORAG_PROGRESS_INTERVAL_S"] = "1.0"
        stack.start_server()
        for n in range(workers):
            stack.start_worker("cpu", name=f"cpu-{n}")
        stack.wait_consumers("cpu", workers)
        # Warm every worker's model: as many short files at once as workers, one each.
        warm = stack.cli("submit", *[str(SAMPLES / "speech.mp3")] * (2 * workers))
        if warm.returncode != 0:
            raise RuntimeError(warm.stderr)
        started = time.perf_counter()
        proc = stack.cli("submit", "--json", str(recording), timeout=7200)
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"{proc.stderr}\n{stack.all_logs()}")
        return elapsed, json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the recording")
    parser.add_argument("--chunk-s", type=float, default=300.0, help="MORAG_SPLIT_CHUNK_S of the split run")
    parser.add_argument("--workers", type=int, default=2, help="CPU workers of the split run")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        loops = max(1, math.ceil(args.minutes * 60 / SAMPLE_S) - 1)
        recording = looped_speech(Path(tmp) / "long.mp3", loops)
        whole_s, split_s, rates, pieces = [], [], [], []
        truth: list[tuple[float, float]] = []
        split = {"MORAG_SPLIT_OVER_S": f"{args.chunk_s:g}", "MORAG_SPLIT_CHUNK_S": f"{args.chunk_s:g}"}
        for _ in range(args.rounds):
            seconds, whole = timed_run(recording, 1, {"MORAG_SPLIT_OVER_S": "0"})
            whole_s.append(seconds)
            seconds, parts = timed_run(recording, args.workers, split)
            split_s.append(seconds)
            if "chunks" not in parts["input"]:
                raise RuntimeError("the split run was not split")
            pieces.append(len(parts["input"]["chunks"]))
            rates.append(word_error_rate(words(whole["text"]), words(parts["text"])))
            spoken = spoken_words() * (loops + 1)
            truth.append(
                (word_error_rate(spoken, words(whole["text"])), word_error_rate(spoken, words(parts["text"])))
            )
        duration = whole["result"]["duration"]
        print(
            f"long media: {duration / 60:.1f} min recording (the sample looped), chunks of about "
            f"{args.chunk_s:g} s, median of {args.rounds} rounds"
        )
        print(f"  one worker, whole file          {statistics.median(whole_s):8.1f} s")
        print(
            f"  {args.workers} workers, split in {statistics.median(pieces):.0f} chunks"
            f"   {statistics.median(split_s):8.1f} s   (workers: {', '.join(parts['result']['workers'])})"
        )
        ratio = statistics.median(split_s) / statistics.median(whole_s)
        print(f"  ratio split/whole: {ratio:.2f} (speed-up {1 / ratio:.2f}x)")
        print(
            f"  word error rate, split against whole: {100 * statistics.median(rates):.2f}% "
            f"({len(words(whole['text']))} words; goal at most 1%)"
        )
        print(
            f"  word error rate against the spoken text ({len(spoken)} words): whole "
            f"{100 * statistics.median(t[0] for t in truth):.2f}%, split "
            f"{100 * statistics.median(t[1] for t in truth):.2f}% ({len(words(parts['text']))} words)"
        )


if __name__ == "__main__":
    main()
