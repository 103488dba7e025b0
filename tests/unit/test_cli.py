"""The CLI's errors are one clear line; the embedded mode needs no broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SPOKEN_WORDS, free_port

CLI = [str(Path(sys.executable).parent / "morag-pipeline")]


def run_cli(*args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MORAG_")}
    return subprocess.run(
        [*CLI, *args], env={**clean, **env}, capture_output=True, text=True, timeout=timeout
    )


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_missing_file(tmp_path: Path) -> None:
    line = one_line_error(run_cli("submit", str(tmp_path / "nope.mp4")))
    assert line == f"morag-pipeline: {tmp_path / 'nope.mp4'}: no such file"


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.mp3").touch()
    line = one_line_error(run_cli("submit", str(tmp_path / "empty.mp3")))
    assert line.endswith("empty.mp3: the file is empty")


def test_folder_is_not_a_file(tmp_path: Path) -> None:
    line = one_line_error(run_cli("run", str(tmp_path)))
    assert line.endswith("not a regular file")


def test_unreachable_server(samples: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    line = one_line_error(run_cli("submit", str(samples / "talk.mp4"), MORAG_SERVER_URL=url))
    assert line.startswith(f"morag-pipeline: cannot reach the server at {url}")
    line = one_line_error(run_cli("tasks", MORAG_SERVER_URL=url))
    assert "cannot reach the server" in line


def test_bad_option_is_refused_by_the_parser(samples: Path) -> None:
    proc = run_cli("submit", "--priority", "asap", str(samples / "talk.mp4"))
    assert proc.returncode == 2
    assert "invalid choice: 'asap'" in proc.stderr


NO_BROKER = {"MORAG_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"}


@pytest.mark.slow
def test_run_transcribes_without_broker_or_server(samples: Path, tmp_path: Path) -> None:
    proc = run_cli("run", str(samples / "talk.mp4"), "--output", str(tmp_path), **NO_BROKER)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".md", ".srt", ".txt", ".vtt"]
    text = (tmp_path / "talk.txt").read_text().lower()
    for word in SPOKEN_WORDS:
        assert word in text


@pytest.mark.slow
def test_run_converts_a_document_as_json(samples: Path) -> None:
    proc = run_cli("run", "--json", str(samples / "report.html"), **NO_BROKER)
    assert proc.returncode == 0, proc.stderr
    task = json.loads(proc.stdout)
    assert task["state"] == "done" and task["route"]["queue"] == "cpu"
    assert "| Audio" in task["text"]


@pytest.mark.slow
def test_run_reports_bad_media(corrupt_mp4: Path) -> None:
    proc = run_cli("run", str(corrupt_mp4), **NO_BROKER)
    assert proc.returncode == 1
    assert "broken.mp4: failed" in proc.stderr and "cannot decode audio" in proc.stderr
