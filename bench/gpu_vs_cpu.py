"""The same recordings with the same model on CUDA and on the CPU, in one run: real-time factors
and the GPU's speed-up.

Decodes each file to 16 kHz WAV once (``samples/speech.mp3`` and ``samples/talk.mp4`` by
default; ``--loops N`` plays speech.mp3 N more times, but Whisper unbatched drops or
re-decodes the repeats of a looped recording, so its words and time are not those of
N + 1 different sentences), then, in each round, transcribes every file with
``pipeline.processors.whisper.transcribe`` as a worker does, the model loaded before the
timing starts:

- the baseline: the CPU, int8, one transcription at a time (CTranslate2's threads: every core,
  ``whisper.cpu_threads_for``), unbatched as a CPU worker runs by default;
- the CPU, int8, batched (for comparison: what batching does without a GPU);
- CUDA, float16, unbatched;
- CUDA, float16, batched (faster-whisper's BatchedInferencePipeline; the batch size a GPU
  worker chooses from the free VRAM), as a GPU worker runs by default.

A configuration's real-time factor is its seconds over the audio's seconds (median over the
rounds; below 1 is faster than real time); each line gives its speed-up over the CPU.
``--max-seconds`` bounds the run: rounds stop once it is spent (each configuration keeps at
least one). On a machine where CUDA cannot run, the CUDA lines say that they were not
measured and why (``pipeline.hardware.cuda_status``), and the CPU half still runs.

    .venv/bin/python -m bench.gpu_vs_cpu --rounds 5 --max-seconds 300
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import hardware
from pipeline.processors import media, whisper
from tests.conftest import SAMPLES, looped_speech


@dataclass
class Config:
    """One way to run the model, and its timings."""

    label: str
    device: str
    compute_type: str
    batched: str
    seconds: list[float] = field(default_factory=list)  # one per round: every file
    inference: dict = field(default_factory=dict)
    words: int = 0


def audio_files(folder: Path, loops: int, names: list[str]) -> list[tuple[Path, float]]:
    """Each file as WAV with its seconds; ``speech.mp3`` looped ``loops`` more times."""
    found = []
    for name in names:
        source = SAMPLES / name if not Path(name).exists() else Path(name)
        if source.name == "speech.mp3" and loops:
            source = looped_speech(folder / "speech-looped.mp3", loops)
        wav = media.extract_audio(source, folder / f"{source.stem}.wav")
        info = media.probe(wav)
        found.append((wav, info.duration if info and info.duration else 0.0))
    return found


def run(config: Config, files: list[tuple[Path, float]], model: str) -> float:
    """Seconds to transcribe every file once."""
    started = time.perf_counter()
    words = 0
    for wav, _ in files:
        transcript = whisper.transcribe(
            wav, model=model, device=config.device, compute_type=config.compute_type,
            batched=config.batched, max_loaded=2,  # the CPU's and CUDA's, both kept loaded
        )  # fmt: skip
        words += len(transcript.text.split())
        config.inference = transcript.inference
    config.words = words
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=whisper.BUNDLED_MODEL)
    parser.add_argument("--files", nargs="+", default=["speech.mp3", "talk.mp4"])
    parser.add_argument("--loops", type=int, default=0, help="extra plays of speech.mp3 (about 9 s each)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=300.0)
    args = parser.parse_args()
    started = time.monotonic()

    cuda = hardware.cuda_status("cuda")
    configs = [Config("cpu int8", "cpu", "int8", "off"), Config("cpu int8 batched", "cpu", "int8", "on")]
    if cuda["usable"]:
        configs += [
            Config("cuda float16", "cuda", "float16", "off"),
            Config("cuda float16 batched", "cuda", "float16", "on"),
        ]
    with tempfile.TemporaryDirectory() as tmp:
        files = audio_files(Path(tmp), args.loops, args.files)
        audio_s = sum(seconds for _, seconds in files)
        for config in configs:  # warm: the model loaded, CUDA's kernels picked
            run(config, files[:1], args.model)
        rounds = 0
        for _ in range(args.rounds):
            for config in configs:
                config.seconds.append(run(config, files, args.model))
            rounds += 1
            if time.monotonic() - started > args.max_seconds:
                break

    print(
        f"gpu_vs_cpu: model {args.model}, {len(files)} files, {audio_s:.1f} s of audio, {rounds} rounds"
        + (f" (cut by --max-seconds {args.max_seconds:g})" if rounds < args.rounds else "")
    )
    baseline = statistics.median(configs[0].seconds)
    for config in configs:
        median = statistics.median(config.seconds)
        how = ", ".join(f"{k} {v}" for k, v in config.inference.items() if v not in (None, False))
        print(
            f"  {config.label:<22} {median:8.2f} s   RTF {median / audio_s:.4f}   "
            f"speed-up {baseline / median:.2f}x   ({how or 'unbatched'}; {config.words} words)"
        )
    if not cuda["usable"]:
        reason = "; ".join(cuda["problems"]) or "no CUDA device"
        print(f"  cuda: not measured: {reason}")


if __name__ == "__main__":
    main()
