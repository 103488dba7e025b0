"""Every kind as users meet it: ``morag-pipeline run`` takes files and URLs alike, a URL that
answers with a recording goes on as a transcription, and each bad input fails with its reason and
leaves nothing behind; ``submit`` sends a URL for a worker to fetch, and the server refuses a
private one before any task is made."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.cli.client import ApiClient
from pipeline.config import Settings, use_settings
from pipeline.kinds import CONVERT, IMAGE, MEDIA_URL, TRANSCRIBE, WEB
from pipeline.services import build_services
from tests.conftest import SPOKEN_WORDS, TEST_SECRET, free_port, in_process_api
from tests.processors.test_images import WORDS, render
from tests.unit.test_cli import NO_BROKER, one_line_error, run_cli, submit
from tests.web_pages import SUBTITLES, local_site

FETCH = {"MORAG_FETCH_ALLOW_HOSTS": "127.0.0.1", "MORAG_FETCH_MAX_MB": "1", "MORAG_FETCH_MAX_REDIRECTS": "3"}


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    with local_site() as base:
        yield base


@pytest.mark.slow
def test_run_takes_every_kind_and_says_why_each_bad_input_failed(
    site: str, samples: Path, tmp_path: Path
) -> None:
    temp = tmp_path / "temp"
    temp.mkdir()
    photo = render(tmp_path / "invoice.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 16)
    inputs = [
        f"{site}/news/gpu-farms.html",
        f"{site}/talks/speech.mp3",
        str(photo),
        str(samples / "report.html"),
    ]
    bad = [f"{site}/{path}" for path in ("big.html", "loop", "missing", "to-localhost", "data.bin")] + [
        str(broken)
    ]
    proc = run_cli("run", "--json", *inputs, *bad, timeout=300, TMPDIR=str(temp), **FETCH, **NO_BROKER)
    assert proc.returncode == 1, proc.stderr
    tasks = json.loads(proc.stdout)
    article, speech, image, report, *failed = tasks

    assert [(t["kind"], t["state"]) for t in (article, speech, image, report)] == [
        (WEB.name, "done"), (TRANSCRIBE.name, "done"), (IMAGE.name, "done"), (CONVERT.name, "done"),
    ]  # fmt: skip
    assert article["route"]["queue"] == "cpu" and article["filename"] == "gpu-farms.html"
    assert (
        article["text"].startswith("# GPU farms for ingestion\n")
        and "- Author: Ada Lovelace" in article["text"]
    )
    # The recording the URL answered with was transcribed, as a second stage of the same task.
    assert speech["input"]["url"] == f"{site}/talks/speech.mp3"
    assert [stage["kind"] for stage in speech["input"]["stages"]] == [WEB.name]
    assert [e["event"] for e in speech["events"]].count("stage done") == 1
    assert {o["format"] for o in speech["outputs"]} == set(TRANSCRIBE.formats)
    for word in SPOKEN_WORDS:
        assert word in speech["text"].lower()
    for line in WORDS:
        assert line in image["text"]

    assert {t["state"] for t in failed} == {"failed"}
    errors = [t["error"] for t in failed]
    assert "larger than the 1 MiB allowed for web pages (MORAG_FETCH_MAX_MB)" in errors[0]
    assert "more than 3 redirects (MORAG_FETCH_MAX_REDIRECTS)" in errors[1]
    assert "HTTP 404 Not Found" in errors[2]
    assert (
        "localhost resolves to a private address" in errors[3]
        and "MORAG_FETCH_ALLOW_PRIVATE=true" in errors[3]
    )
    assert errors[4].startswith("web stage: data.bin: unsupported content")
    assert "cannot read the PNG image" in errors[5]
    # No download, no work folder, no store left behind (libraries may leave their own notes).
    assert [p.name for p in temp.iterdir() if p.name.startswith("morag-")] == []


@pytest.mark.slow
def test_run_downloads_media_urls_and_transcribes_them_with_their_metadata(site: str, tmp_path: Path) -> None:
    temp = tmp_path / "temp"
    temp.mkdir()
    inputs = [f"{site}/hls/speech.m3u8", f"{site}/watch/talk.html"]
    bad = [f"{site}/hls/{name}.m3u8" for name in ("missing", "to-localhost", "long", "big")]
    bad.append(f"http://127.0.0.1:{free_port()}/gone.m3u8")
    limits = {"MORAG_MAX_UPLOAD_MB": "1", "MORAG_MEDIA_MAX_DURATION_S": "40"}
    proc = run_cli(
        "run", "--json", *inputs, *bad, timeout=300, TMPDIR=str(temp), **FETCH, **limits, **NO_BROKER
    )
    assert proc.returncode == 1, proc.stderr
    playlist, page, *failed = json.loads(proc.stdout)

    # An HLS playlist is a media URL: downloaded by a CPU worker, then transcribed.
    assert (playlist["kind"], playlist["state"]) == (TRANSCRIBE.name, "done"), playlist.get("error")
    assert [stage["kind"] for stage in playlist["input"]["stages"]] == [MEDIA_URL.name]
    assert [e["event"] for e in playlist["events"]].count("stage done") == 1
    source = playlist["result"]["source"]
    assert (source["title"], source["webpage_url"], source["duration"]) == ("speech", inputs[0], 9)
    assert all(word in playlist["text"].lower() for word in SPOKEN_WORDS)
    # A page with no article that embeds a video goes on as a media URL, and its subtitles come too.
    assert (page["kind"], page["state"]) == (TRANSCRIBE.name, "done"), page.get("error")
    assert [stage["kind"] for stage in page["input"]["stages"]] == [WEB.name, MEDIA_URL.name]
    assert page["result"]["source"]["subtitles"]["en"]["text"] == SUBTITLES.decode()
    assert page["result"]["source"]["title"].startswith("Remote GPU workers")
    assert all(word in page["text"].lower() for word in SPOKEN_WORDS)

    assert {t["state"] for t in failed} == {"failed"}
    errors = [t["error"] for t in failed]
    assert all(error.startswith("media_url stage: ") for error in errors), errors
    assert "HTTP Error 404: Not Found" in errors[0]
    assert (
        "localhost resolves to a private address" in errors[1]
        and "MORAG_FETCH_ALLOW_PRIVATE=true" in errors[1]
    )
    assert "longer than the 40s allowed (MORAG_MEDIA_MAX_DURATION_S)" in errors[2]
    assert "larger than the 1 MiB allowed for media URLs (MORAG_MAX_UPLOAD_MB)" in errors[3]
    assert "cannot connect to 127.0.0.1" in errors[4]
    # No download, no work folder, no store left behind.
    assert [p.name for p in temp.iterdir() if p.name.startswith("morag-")] == []


def test_run_refuses_a_private_url_before_anything_is_fetched(site: str) -> None:
    line = one_line_error(run_cli("run", f"{site}/news/gpu-farms.html", **NO_BROKER))
    assert "127.0.0.1 resolves to a private address (127.0.0.1): refused" in line
    assert "MORAG_FETCH_ALLOW_PRIVATE=true" in line


@pytest.fixture
def api_client(tmp_path: Path, stub_broker) -> Iterator[ApiClient]:  # type: ignore[no-untyped-def]
    """The API in-process, with 127.0.0.1 allowed by name and no worker consuming."""
    settings = use_settings(
        Settings(
            data_dir=tmp_path / "data", secret_key=TEST_SECRET, file_access="shared",
            fetch_allow_hosts=["127.0.0.1"],
        )
    )  # fmt: skip
    client = ApiClient("http://testserver")
    with in_process_api(build_services(settings), stub_broker) as http:
        client.http = http
        yield client
    stub_broker.flush_all()


def test_submit_sends_a_url_to_be_fetched_and_the_server_refuses_a_private_one(
    api_client: ApiClient, site: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    page, private = f"{site}/news/gpu-farms.html", f"{site.replace('127.0.0.1', 'localhost')}/x.html"
    code = submit(api_client, "--json", "--no-wait", page, private)
    out, err = capsys.readouterr()
    assert code == 1
    queued, refused = json.loads(out)
    assert (queued["kind"], queued["state"], queued["input"]["url"]) == (WEB.name, "queued", page)
    assert queued["route"]["queue"] == "cpu" and queued["filename"] == "gpu-farms.html"
    assert refused["state"] == "refused" and "MORAG_FETCH_ALLOW_PRIVATE=true" in refused["error"]
    assert f"morag-pipeline: {private}: refused: localhost resolves to a private address" in err
    # The refused URL made no task and no file; the queued one has no file until a worker fetches it.
    assert [t["id"] for t in api_client.tasks()["tasks"]] == [queued["id"]]
    assert [p.name for p in (tmp_path / "data" / "files" / "tasks").iterdir()] == [queued["id"]]
    assert [p for p in (tmp_path / "data" / "files").rglob("*") if p.is_file()] == []


def test_submit_sends_a_media_url_to_be_downloaded_on_a_cpu_worker(
    api_client: ApiClient, site: str, capsys: pytest.CaptureFixture
) -> None:
    playlist = f"{site}/hls/speech.m3u8"
    assert submit(api_client, "--json", "--no-wait", playlist) == 0
    queued = json.loads(capsys.readouterr().out)
    assert (queued["kind"], queued["state"], queued["input"]["url"]) == (MEDIA_URL.name, "queued", playlist)
    assert queued["route"]["queue"] == "cpu" and queued["filename"] == "speech.m3u8"
