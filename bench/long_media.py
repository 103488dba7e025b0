"""One long recording, transcribed whole by one worker, then cut and spread over two workers.

Builds a recording of M minutes, then, in each round, times
``morag-pipeline submit`` of it on two stacks on fresh vhosts:

- the baseline: splitting off (``MORAG_SPLIT_OVER_S=0``) and one CPU worker,
  which transcribes the whole file as one task;
- split: ``MORAG_SPLIT_OVER_S`` and ``MORAG_SPLIT_CHUNK_S`` set to the chunk
  length, and W CPU workers: a worker finds the cuts, the chunks are
  transcribed by whichever worker is free, the server stitches them.

The recording is one of two materials (``--material``):

- ``prose`` (the default): espeak-ng, the voice of the samples, reads the
  prose of this project's README and docs (code, tables and headings left
  out) for M minutes. It never says the same sentence twice, as a real talk
  does not.
- ``sample``: the speech sample looped (as ``tests/conftest.py::looped_speech``
  does). Whisper conditions each window on the text before it and drops many
  of the repeats, differently in each run, so the word error rate between
  the two runs measures which repeats were dropped, not the cuts.

Each worker's model is warmed by a short submit before the timed one. Prints
the medians, the speed-up, the word error rate of the split transcript against the
whole one (words lower-cased, punctuation dropped; goal at most 1 %), with two
rounds or more that of each round's whole transcript against the next round's (the
same file, unsplit, differs from run to run where faster-whisper's temperature
fallback samples at random: the floor under the first figure), and the word error
rate of each against the text the recording speaks. On a
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
import subprocess
import tempfile
import time
from pathlib import Path

from tests.conftest import SAMPLES, fresh_vhost, looped_speech, open_stack

#: Seconds the speech sample lasts, about.
SAMPLE_S = 9.17
#: Words a minute espeak-ng reads at (as samples/make_samples.sh has it speak).
WORDS_PER_MINUTE = 145
ROOT = SAMPLES.parent
#: Seconds of silence put before the recording for the run that shows how much the transcript
#: depends on where the model's 30-second windows fall, with no cut at all.
SHIFT_S = 0.5


def spoken_words() -> list[str]:
    """The words samples/make_samples.sh gives espeak-ng: what the sample says."""
    script = (SAMPLES / "make_samples.sh").read_text()
    found = re.search(r'^text="([^"]+)"$', script, re.MULTILINE)
    if found is None:
        raise RuntimeError("samples/make_samples.sh sets no text")
    return words(found.group(1))


def prose(count: int) -> str:
    """About ``count`` words of the README's and docs' prose: paragraphs of plain sentences,
    without code blocks, tables, headings, lists of commands or inline code."""
    sentences: list[str] = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = re.sub(r"```.*?```", "\n\n", doc.read_text(encoding="utf-8"), flags=re.DOTALL)
        text = re.sub(r"^\s*(?:[-*>]|\d+\.)\s+", "\n\n", text, flags=re.MULTILINE)  # list items apart
        for block in re.split(r"\n\s*\n", text):
            if block.lstrip().startswith(("#", "|", "<")) or block.startswith("    "):
                continue
            block = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", " ".join(block.split())).replace("*", "")
            for sentence in re.split(r"(?<=[.!?])\s+", block):
                plain = "`" not in sentence and "://" not in sentence
                if plain and len(words(sentence)) >= 6 and re.fullmatch(r"[A-Za-z0-9 ,.;:'()%/-]+", sentence):
                    sentences.append(sentence)
    chosen, total = [], 0
    for sentence in dict.fromkeys(sentences):  # each once, in order
        if total >= count:
            break
        chosen.append(sentence.rstrip(":.") + ".")
        total += len(words(sentence))
    if total < count:
        raise RuntimeError(f"the docs hold {total} words of prose, fewer than the {count} asked")
    return "\n\n".join(chosen)


def spoken_prose(path: Path, minutes: float) -> tuple[Path, list[str]]:
    """A recording of espeak-ng reading ``minutes`` of the docs' prose, and the words it says."""
    text = prose(int(minutes * WORDS_PER_MINUTE))
    wav = path.with_suffix(".wav")
    subprocess.run(
        ["espeak-ng", "-v", "en-us", "-s", str(WORDS_PER_MINUTE), "-w", str(wav)],
        input=text.encode(),
        check=True,
    )
    subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(wav), "-ac", "1", "-ar", "16000", "-c:a", "libmp3lame",
         "-b:a", "32k", "-y", str(path)],
        check=True,
    )  # fmt: skip
    wav.unlink()
    return path, words(text)


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


def timed_runs(recordings: list[Path], workers: int, settings: dict[str, str]) -> list[tuple[float, dict]]:
    """(seconds of submit until the transcript is back, the task) of each recording in turn, on
    one fresh stack."""
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
        runs = []
        for recording in recordings:
            started = time.perf_counter()
            proc = stack.cli("submit", "--json", str(recording), timeout=7200)
            elapsed = time.perf_counter() - started
            if proc.returncode != 0:
                raise RuntimeError(f"{proc.stderr}\n{stack.all_logs()}")
            runs.append((elapsed, json.loads(proc.stdout)))
        return runs


def delayed(recording: Path, seconds: float) -> Path:
    """The same recording with ``seconds`` of silence before it."""
    path = recording.with_name(f"{recording.stem}-later{recording.suffix}")
    subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(recording), "-af", f"adelay={int(seconds * 1000)}:all=1",
         "-ac", "1", "-ar", "16000", "-c:a", "libmp3lame", "-b:a", "32k", "-y", str(path)],
        check=True,
    )  # fmt: skip
    return path


MATERIALS = {"prose": "the docs' prose, read by espeak-ng", "sample": "the sample looped"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the recording")
    parser.add_argument("--chunk-s", type=float, default=300.0, help="MORAG_SPLIT_CHUNK_S of the split run")
    parser.add_argument("--workers", type=int, default=2, help="CPU workers of the split run")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--material", choices=("prose", "sample"), default="prose", help="what the recording says (see above)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.material == "prose":
            recording, spoken = spoken_prose(Path(tmp) / "long.mp3", args.minutes)
        else:
            loops = max(1, math.ceil(args.minutes * 60 / SAMPLE_S) - 1)
            recording, spoken = looped_speech(Path(tmp) / "long.mp3", loops), spoken_words() * (loops + 1)
        later = delayed(recording, SHIFT_S)
        whole_s, split_s, rates, pieces, shifts = [], [], [], [], []
        wholes: list[list[str]] = []  # each round's unsplit transcript, for the noise between runs
        truth: list[tuple[float, float]] = []
        split = {"MORAG_SPLIT_OVER_S": f"{args.chunk_s:g}", "MORAG_SPLIT_CHUNK_S": f"{args.chunk_s:g}"}
        for _ in range(args.rounds):
            (seconds, whole), (_, shifted) = timed_runs([recording, later], 1, {"MORAG_SPLIT_OVER_S": "0"})
            whole_s.append(seconds)
            wholes.append(words(whole["text"]))
            shifts.append(word_error_rate(words(whole["text"]), words(shifted["text"])))
            [(seconds, parts)] = timed_runs([recording], args.workers, split)
            split_s.append(seconds)
            if "chunks" not in parts["input"]:
                raise RuntimeError("the split run was not split")
            pieces.append(len(parts["input"]["chunks"]))
            rates.append(word_error_rate(words(whole["text"]), words(parts["text"])))
            truth.append(
                (word_error_rate(spoken, words(whole["text"])), word_error_rate(spoken, words(parts["text"])))
            )
        duration = whole["result"]["duration"]
        print(
            f"long media: {duration / 60:.1f} min recording ({MATERIALS[args.material]}), chunks of about "
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
            f"  word error rate, whole against the whole of the same recording {SHIFT_S:g} s later: "
            f"{100 * statistics.median(shifts):.2f}% (no cut: where the model's windows fall)"
        )
        if len(wholes) > 1:
            # The same file, unsplit, run again: faster-whisper's temperature fallback samples at
            # random where a window fails its checks, so two runs differ without any cut.
            noise = [word_error_rate(a, b) for a, b in zip(wholes, wholes[1:], strict=False)]
            floor = 100 * statistics.median(noise)
            print(f"  word error rate, whole against the next round's whole: {floor:.2f}%")
        else:
            print("  word error rate, whole against whole: not measured (one round; --rounds 2 measures it)")
        print(
            f"  word error rate against the spoken text ({len(spoken)} words): whole "
            f"{100 * statistics.median(t[0] for t in truth):.2f}%, split "
            f"{100 * statistics.median(t[1] for t in truth):.2f}% ({len(words(parts['text']))} words)"
        )


if __name__ == "__main__":
    main()
