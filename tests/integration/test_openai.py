"""The real ``openai`` client against a real server and an enrolled GPU-queue worker (tiny.en on the
CPU here): JSON, verbose JSON with words, SRT, a translation refused for an English-only model, a bad
key and a bad file, and the snippet of docs/openai.md. Then the transcription options through the
pipeline's own client and ``morag-pipeline submit`` on the same stack."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from pipeline.client import Client
from tests.conftest import ROOT, SAMPLES, SPOKEN_WORDS, Stack, fresh_vhost, open_stack

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

SPEECH = SAMPLES / "speech.mp3"


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, rabbitmq_available: None) -> Iterator[Stack]:
    """One server and one GPU-queue worker for the module's tests."""
    with fresh_vhost() as vhost, open_stack(tmp_path_factory.mktemp("stack"), vhost) as stack:
        stack.start_server()
        stack.start_worker("gpu")
        stack.wait_consumers("gpu")
        yield stack


def openai_client(stack: Stack, api_key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{stack.url}/v1", api_key=api_key or stack.env["MORAG_API_KEY"], max_retries=0, timeout=300
    )


def test_the_openai_client_uses_the_fleet(running: Stack) -> None:
    client = openai_client(running)
    assert [m.id for m in client.models.list()] == ["tiny.en"]
    with SPEECH.open("rb") as audio:
        raw = client.audio.transcriptions.with_raw_response.create(model="whisper-1", file=audio)
    assert all(word in raw.parse().text.lower() for word in SPOKEN_WORDS)
    task = running.get(f"/api/v1/tasks/{raw.headers['x-task-id']}").json()
    assert task["state"] == "done" and task["route"]["queue"] == "gpu" and task["worker"] == "gpu-worker"

    with SPEECH.open("rb") as audio:
        verbose = client.audio.transcriptions.create(
            model="tiny.en", file=audio, language="en", response_format="verbose_json",
            timestamp_granularities=["word", "segment"],
        )  # fmt: skip
    assert verbose.language == "english" and verbose.duration == pytest.approx(9.2, abs=0.3)
    assert verbose.segments and verbose.segments[0].text
    assert " ".join(w.word for w in verbose.words).lower().startswith("welcome to the speech pipeline")
    assert all(0 <= w.start <= w.end <= verbose.duration + 0.1 for w in verbose.words)

    with SPEECH.open("rb") as audio:
        srt = client.audio.transcriptions.create(
            model="tiny.en", file=audio, response_format="srt", timestamp_granularities=["word"]
        )
    cues = [block.split("\n")[2] for block in srt.strip().split("\n\n")]
    assert srt.startswith("1\n00:00:0") and len(cues) > 2 and all(len(c.split()) <= 7 for c in cues)

    with SPEECH.open("rb") as audio, pytest.raises(openai.BadRequestError) as refused:
        client.audio.translations.create(model="whisper-1", file=audio)
    assert refused.value.param == "model" and "English-only: it cannot translate" in refused.value.message


def test_a_bad_key_and_a_bad_file_get_openais_errors(running: Stack) -> None:
    with SPEECH.open("rb") as audio, pytest.raises(openai.AuthenticationError) as denied:
        openai_client(running, "mpk_000000000000_wrong").audio.transcriptions.create(
            model="tiny.en", file=audio
        )
    assert denied.value.status_code == 401 and denied.value.code == "invalid_api_key"
    with pytest.raises(openai.APIStatusError) as bad:
        openai_client(running).audio.transcriptions.create(
            model="tiny.en", file=("notes.mp3", b"these are not the sounds you are looking for\n" * 20)
        )
    assert bad.value.status_code in (400, 415) and bad.value.type == "invalid_request_error"
    assert bad.value.param == "file" and bad.value.message


def test_the_docs_snippet_runs(running: Stack) -> None:
    snippet = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "openai.md").read_text(), re.DOTALL)
    assert snippet, "docs/openai.md has no python snippet"
    proc = subprocess.run(
        [sys.executable, "-c", snippet.group(1)], cwd=ROOT, env=running.env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    language, text, *words = proc.stdout.splitlines()
    assert language.startswith("english 9.")
    assert all(word in text.lower() for word in SPOKEN_WORDS)
    assert words[0].split()[-1] == "Welcome" and len(words) == 3


def test_transcription_options_through_the_client_and_the_cli(running: Stack, tmp_path: Path) -> None:
    with Client(running.url, api_key=running.env["MORAG_API_KEY"]) as client:
        task = client.submit(SPEECH, language="auto", word_timestamps=True, max_words_per_cue=3)
        final = task.wait(timeout=300)
        assert final["state"] == "done", final.get("error")
        assert final["options"]["language"] == "auto" and final["result"]["language"] == "en"
        assert 0 < final["result"]["language_probability"] <= 1 and final["result"]["words"] > 15
        transcript = json.loads(task.result("json"))
        assert transcript["segments"][0]["words"][0]["word"].strip() == "Welcome"
        cues = task.result("vtt").decode().split("\n\n")[1:]
        assert all(len(cue.split("\n")[1].split()) <= 3 for cue in cues if cue.strip())
    status = running.cli("status", final["id"])
    assert "language: en (detected, probability" in status.stdout
    proc = running.cli("submit", str(SPEECH), "--vad", "--output", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    morag = (tmp_path / "speech.morag.md").read_text()
    assert morag.startswith("# Audio Transcription: speech.mp3\n\n## Metadata\n")
    assert "\n[00:00][SPEAKER_00] Welcome to the speech pipeline." in morag
    assert json.loads((tmp_path / "speech.json").read_text())["options"] == {"vad": True}
    refused = running.cli("submit", str(SPEECH), "--language", "english")
    assert (
        refused.returncode == 2
        and "unknown language 'english'" in refused.stderr
        and "'en'" in refused.stderr
    )
