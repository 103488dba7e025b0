"""The committed speech samples are transcribed faithfully: ``morag-pipeline run``
with the bundled tiny.en model hears each with a word error rate of at most 10 %
against the text samples/make_samples.sh speaks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SAMPLES, free_port

CLI = [str(Path(sys.executable).parent / "morag-pipeline")]
MEDIA = ("talk.mp4", "speech.mp3")
MAX_WER = 0.10


def spoken_text() -> str:
    """The text samples/make_samples.sh gives espeak-ng."""
    script = (SAMPLES / "make_samples.sh").read_text()
    match = re.search(r'^text="([^"]+)"$', script, re.MULTILINE)
    assert match, "samples/make_samples.sh sets no text"
    return match.group(1)


def normalised_words(text: str) -> list[str]:
    """Lower-case words without punctuation; a hyphen separates words."""
    return re.findall(r"[a-z0-9']+", text.lower())


def word_error_rate(reference: str, heard: str) -> float:
    """Substitutions, insertions and deletions of words that turn ``reference``
    into ``heard`` (their Levenshtein distance over words), per reference word."""
    ref, hyp = normalised_words(reference), normalised_words(heard)
    previous = list(range(len(hyp) + 1))
    for i, word in enumerate(ref, 1):
        row = [i]
        for j, other in enumerate(hyp, 1):
            row.append(min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (word != other)))
        previous = row
    return previous[-1] / len(ref)


def test_word_error_rate_counts_each_kind_of_mistake() -> None:
    said = "the quick brown fox jumps over the lazy dog"
    assert word_error_rate(said, "The quick, brown fox jumps over the lazy dog.") == 0
    # What the earlier sample was heard as: three substitutions and a deletion.
    assert word_error_rate(said, "the quick roundfuck stump over the lazy log") == pytest.approx(4 / 9)
    assert word_error_rate(said, "the quick brown fox jumps over over the lazy dog") == pytest.approx(1 / 9)
    assert word_error_rate("graphics card", "graphics-card") == 0


@pytest.fixture(scope="module")
def transcripts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each sample's plain-text transcript from one ``morag-pipeline run`` of both."""
    out = tmp_path_factory.mktemp("transcripts")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MORAG_")}
    env["MORAG_BROKER_URL"] = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"  # none: run needs none
    env["MORAG_DATA_DIR"] = str(out / "data")
    proc = subprocess.run(
        [*CLI, "run", "--output", str(out), *(str(SAMPLES / name) for name in MEDIA)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return {name: (out / name).with_suffix(".txt").read_text() for name in MEDIA}


@pytest.mark.slow
@pytest.mark.parametrize("name", MEDIA)
def test_each_sample_is_transcribed_faithfully(transcripts: dict[str, str], name: str) -> None:
    heard = transcripts[name]
    assert word_error_rate(spoken_text(), heard) <= MAX_WER, f"{name} was heard as: {heard!r}"
