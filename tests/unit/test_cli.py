"""The CLI's errors are one clear line; ``submit`` reports every file and says why it waits;
the embedded mode needs no broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.cli import display, submit_cmd
from pipeline.cli.client import ApiClient, ClientError
from pipeline.cli.main import build_parser
from pipeline.cli.waiting import Fleet, why_waiting
from pipeline.config import Settings, use_settings
from pipeline.services import build_services
from tests.conftest import ROOT, SPOKEN_WORDS, TEST_SECRET, free_port, in_process_api

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
    proc = run_cli("run", str(samples / "talk.mp4"), "--output", str(tmp_path), "--word-timestamps",
                   "--language", "auto", **NO_BROKER)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    names = ["talk.json", "talk.md", "talk.morag.md", "talk.srt", "talk.txt", "talk.vtt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    text = (tmp_path / "talk.txt").read_text().lower()
    for word in SPOKEN_WORDS:
        assert word in text
    transcript = json.loads((tmp_path / "talk.json").read_text())
    assert transcript["options"] == {"language": "auto", "word_timestamps": True}
    assert transcript["language"] == "en" and 0 < transcript["language_probability"] <= 1
    assert all(segment["words"] for segment in transcript["segments"])
    assert (tmp_path / "talk.morag.md").read_text().startswith("# Audio Transcription: talk.mp4\n")


def test_run_refuses_what_the_model_cannot_do(samples: Path) -> None:
    proc = run_cli("run", str(samples / "speech.mp3"), "--task", "translate", **NO_BROKER)
    assert proc.returncode == 2
    assert "model tiny.en is English-only: it cannot translate" in proc.stderr
    proc = run_cli("run", str(samples / "speech.mp3"), "--language", "xx", **NO_BROKER)
    assert proc.returncode == 2 and "argument --language: unknown language 'xx'" in proc.stderr


@pytest.mark.slow
def test_run_converts_a_document_as_json(samples: Path) -> None:
    proc = run_cli("run", "--json", str(samples / "report.html"), **NO_BROKER)
    assert proc.returncode == 0, proc.stderr
    # One process with nothing to verify: no warning about signatures, no JSON log line at all.
    assert "unsigned" not in proc.stderr and '"level"' not in proc.stderr, proc.stderr
    task = json.loads(proc.stdout)
    assert task["state"] == "done" and task["route"]["queue"] == "cpu"
    assert "| Audio" in task["text"]


@pytest.mark.slow
def test_run_reports_bad_media(corrupt_mp4: Path) -> None:
    proc = run_cli("run", str(corrupt_mp4), **NO_BROKER)
    assert proc.returncode == 1
    assert "broken.mp4: failed" in proc.stderr and "cannot decode audio" in proc.stderr


# ``submit`` in-process: the API over Dramatiq's stub broker, with no worker consuming,
# so every task it sends stays queued.


@pytest.fixture
def api_client(tmp_path: Path, stub_broker) -> Iterator[ApiClient]:  # type: ignore[no-untyped-def]
    settings = use_settings(
        Settings(data_dir=tmp_path / "data", secret_key=TEST_SECRET, file_access="shared")
    )
    client = ApiClient("http://testserver")
    with in_process_api(build_services(settings), stub_broker) as http:
        client.http = http
        yield client
    stub_broker.flush_all()


@pytest.fixture
def fake_mp4(tmp_path: Path) -> Path:
    path = tmp_path / "holiday.mp4"
    path.write_text("just some text, not a video\n")
    return path


def submit(client: ApiClient, *argv: str) -> int:
    return submit_cmd.cmd_submit(build_parser().parse_args(["submit", *argv]), client)


def test_a_refused_file_is_said_and_the_others_go_on(
    api_client: ApiClient, samples: Path, fake_mp4: Path, docx_file: Path, capsys: pytest.CaptureFixture
) -> None:
    files = [str(samples / "report.html"), str(fake_mp4), str(docx_file)]
    code = submit(api_client, "--json", "--timeout", "0.5", *files)
    out, err = capsys.readouterr()
    assert code == 1
    assert "morag-pipeline: holiday.mp4: refused: the content is plain text" in err
    entries = json.loads(out)
    assert [(e["filename"], e["state"]) for e in entries] == [
        ("report.html", "queued"), ("holiday.mp4", "refused"), ("budget.docx", "queued"),
    ]  # fmt: skip
    assert "plain text" in entries[1]["error"] and entries[1]["id"] is None
    # Nothing consumes the cpu queue: the timeout ends the wait and says why.
    for entry in (entries[0], entries[2]):
        assert entry["waiting"] == "no live cpu worker, 2 waiting on cpu"
        assert f"{entry['filename']}: not ended, still queued: no live cpu worker" in err
        assert f"morag-pipeline status {entry['id']}" in err
        assert api_client.task(entry["id"])["state"] == "queued"
    assert "3 files: 2 queued, 1 refused" in err


def test_no_wait_prints_the_ids_sent_and_exits_1_when_one_was_refused(
    api_client: ApiClient, samples: Path, fake_mp4: Path, capsys: pytest.CaptureFixture
) -> None:
    code = submit(api_client, "--no-wait", str(fake_mp4), str(samples / "report.html"))
    out, err = capsys.readouterr()
    assert code == 1
    [task_id] = out.split()
    assert api_client.task(task_id)["filename"] == "report.html"
    assert "holiday.mp4: refused" in err


def test_every_file_refused_is_exit_2_with_each_in_the_json(
    api_client: ApiClient, fake_mp4: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    other = tmp_path / "other.mp3"
    other.write_text("not audio either\n")
    code = submit(api_client, "--json", str(fake_mp4), str(other))
    out, err = capsys.readouterr()
    assert code == 2
    assert [(e["filename"], e["state"]) for e in json.loads(out)] == [
        ("holiday.mp4", "refused"), ("other.mp3", "refused"),
    ]  # fmt: skip
    assert "holiday.mp4: refused" in err and "other.mp3: refused" in err


class LosesTheServer(ApiClient):
    """Answers the first upload, then no longer reaches the server for uploads."""

    def submit(self, path: Path, **form: str | None) -> dict:
        if getattr(self, "sent", False):
            raise ClientError("cannot reach the server at http://testserver")
        self.sent = True
        return super().submit(path, **form)


def test_an_unreachable_server_stops_the_sending_and_the_sent_task_is_still_shown(
    api_client: ApiClient, samples: Path, docx_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    client = LosesTheServer("http://testserver")
    client.http = api_client.http
    notes = tmp_path / "notes.md"
    notes.write_text("# Notes\n")
    files = [str(samples / "report.html"), str(docx_file), str(notes)]
    code = submit(client, "--json", "--timeout", "0.3", *files)
    out, err = capsys.readouterr()
    assert code == 1
    assert "cannot reach the server at http://testserver; not sent: budget.docx, notes.md" in err
    states = [(e["filename"], e["state"]) for e in json.loads(out)]
    assert states == [("report.html", "queued"), ("budget.docx", "unsent"), ("notes.md", "unsent")]


def test_a_task_that_does_not_move_gets_its_reason(capsys: pytest.CaptureFixture) -> None:
    now = [0.0]

    def get_task(task_id: str) -> dict:
        now[0] += 1.0  # a poll per second of this clock
        state = "done" if now[0] > 40 else "queued"
        return {"id": task_id, "filename": "talk.mp4", "state": state, "route": {"queue": "gpu"}}

    [task] = display.follow(
        ["t1"], {"t1": "talk.mp4"}, get_task, max_poll=0.01, clock=lambda: now[0],
        diagnose=lambda t: "no live gpu worker, 3 waiting on gpu",
    )  # fmt: skip
    assert task["state"] == "done"
    err = capsys.readouterr().err.splitlines()
    said = [line for line in err if "no live gpu worker" in line]
    assert said == ["talk.mp4: queued for 15s: no live gpu worker, 3 waiting on gpu"]  # once, not every poll
    assert err[-1] == "talk.mp4: done"


def worker(name: str, state: str = "alive", queues: tuple[str, ...] = ("cpu",), **more: object) -> dict:
    return {"id": name, "state": state, "queues": list(queues), "threads": 1, "current": [], **more}


def queued(task_id: str, queue: str, created_at: float) -> dict:
    return {"id": task_id, "state": "queued", "route": {"queue": queue}, "created_at": created_at}


def test_why_a_task_waits() -> None:
    mine = queued("t3", "cpu", 30.0)
    waiting = [queued("t1", "cpu", 10.0), queued("t2", "cpu", 20.0), mine, queued("g1", "gpu", 5.0)]
    nobody = Fleet([worker("cpu-1", "dead")], {"cpu": {"live": 0}}, waiting)
    assert why_waiting(mine, nobody) == "no live cpu worker (cpu-1 dead), 3 waiting on cpu"
    busy = Fleet([worker("cpu-1", current=["t0"]), worker("cpu-2")], {"cpu": {"live": 2}}, waiting)
    assert why_waiting(mine, busy) == "waiting behind 2 earlier tasks on cpu (2 live cpu workers, 1 busy)"
    first = Fleet([worker("cpu-1")], {"cpu": {"live": 1}}, waiting[2:])
    assert (
        why_waiting(mine, first)
        == "first in line on cpu, not yet started by any worker (1 live cpu worker, 0 busy)"
    )
    retrying = {"event": "retrying", "detail": {"reason": "database is locked"}}
    running = {"id": "t3", "state": "running", "worker": "cpu-1", "progress": {"stage": "converting"},
               "route": {"queue": "cpu"}, "events": [retrying]}  # fmt: skip
    gone = Fleet([worker("cpu-1", "dead", age_s=95.4)], {"cpu": {"live": 0}}, [])
    assert why_waiting(running, gone) == (
        "its worker cpu-1 is dead (last heartbeat 95s ago); last event: retrying (database is locked)"
    )


def test_the_cli_starts_without_the_database_layer() -> None:
    """Every command pays the CLI's imports: those of the store (SQLAlchemy), of the server's
    services, of Dramatiq, periodiq and the processors wait for the commands that use them."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, pipeline.cli.main; print(sorted(m for m in sys.modules))"],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout  # fmt: skip
    heavy_modules = (
        "sqlalchemy", "pipeline.services", "pipeline.store", "paramiko", "dramatiq", "periodiq",
        "pipeline.processors.images", "pipeline.processors.media", "pipeline.processors.documents",
    )  # fmt: skip
    for heavy in heavy_modules:
        assert repr(heavy) not in loaded, f"{heavy} is imported at the CLI's start"
