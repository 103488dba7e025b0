"""``submit`` with several files on a real stack: a refused file does not stop the others,
and a wait that cannot end says why and ends at ``--timeout``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Stack

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def test_a_refused_file_in_the_middle_does_not_stop_the_others(
    stack: Stack, samples: Path, docx_file: Path, tmp_path: Path
) -> None:
    stack.start_server()
    stack.start_worker("cpu")
    stack.wait_consumers("cpu")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_text("a text file that calls itself a video\n")

    proc = stack.cli("submit", "--json", str(samples / "report.html"), str(corrupt), str(docx_file))

    assert proc.returncode == 1, proc.stderr
    assert "morag-pipeline: corrupt.mp4: refused: the content is plain text" in proc.stderr
    assert "3 files: 2 done, 1 refused" in proc.stderr
    entries = json.loads(proc.stdout)
    states = [(e["filename"], e["state"]) for e in entries]
    assert states == [("report.html", "done"), ("corrupt.mp4", "refused"), ("budget.docx", "done")], entries
    assert entries[1]["id"] is None and "plain text" in entries[1]["error"]
    assert "## Volumes by kind" in entries[0]["text"]
    assert "Budget review" in entries[2]["text"]


def test_timeout_ends_a_wait_no_worker_can_end_and_says_why(stack: Stack, samples: Path) -> None:
    stack.start_server()  # and no worker at all

    proc = stack.cli("submit", "--json", "--timeout", "5", str(samples / "report.html"), timeout=120)

    assert proc.returncode == 1, proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if "not ended" in line]
    assert line.startswith("report.html: not ended, still queued: no live cpu worker, 1 waiting on cpu")
    task = json.loads(proc.stdout)
    assert task["state"] == "queued" and task["waiting"].startswith("no live cpu worker")
    assert f"morag-pipeline status {task['id']}" in line
    status = stack.cli("status", "--json", task["id"])
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["state"] == "queued"  # it goes on on the server
