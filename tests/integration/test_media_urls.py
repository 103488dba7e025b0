"""Media URLs through a real server, an enrolled CPU worker and a GPU-queue worker (files over
SFTP): the CPU worker downloads the media with yt-dlp, the server stores it and routes the
transcription to the GPU queue, and ``status`` shows both stages, each by its worker, with the
source's metadata; a bad media URL fails naming the stage and leaves nothing behind."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.kinds import MEDIA_URL, TRANSCRIBE, WEB
from tests.conftest import SPOKEN_WORDS, Stack
from tests.web_pages import SUBTITLES, local_site

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def test_a_cpu_worker_downloads_media_urls_and_a_gpu_worker_transcribes_them(
    stack: Stack, tmp_path: Path
) -> None:
    settings = {"MORAG_FETCH_ALLOW_HOSTS": "127.0.0.1", "MORAG_MEDIA_MAX_DURATION_S": "40"}
    stack.env.update(settings)
    stack.start_server()
    worker_temp = tmp_path / "worker-temp"
    worker_temp.mkdir()
    stack.start_worker("cpu", TMPDIR=str(worker_temp), **settings)
    stack.start_worker("gpu", MORAG_WHISPER_DEVICE="cpu")
    stack.wait_consumers("cpu")
    stack.wait_consumers("gpu")
    with local_site() as site:
        urls = [f"{site}/{path}" for path in ("hls/speech.m3u8", "watch/talk.html", "hls/to-localhost.m3u8")]
        urls.append(f"{site}/hls/long.m3u8")
        proc = stack.cli("submit", "--json", *urls, timeout=300)
        assert proc.returncode == 1, proc.stderr
        playlist, page, private, long = json.loads(proc.stdout)

    for task, stages in ((playlist, [MEDIA_URL.name]), (page, [WEB.name, MEDIA_URL.name])):
        assert (task["kind"], task["state"]) == (TRANSCRIBE.name, "done"), task.get("error")
        assert [(s["kind"], s["worker"]) for s in task["input"]["stages"]] == [
            (s, "cpu-worker") for s in stages
        ]
        assert (task["route"]["queue"], task["worker"]) == ("gpu", "gpu-worker")
        assert all(word in task["text"].lower() for word in SPOKEN_WORDS)
    assert playlist["result"]["source"]["title"] == "speech" and playlist["result"]["source"]["duration"] == 9
    assert page["result"]["source"]["subtitles"]["en"]["text"] == SUBTITLES.decode()
    stored = stack.data_dir / "files" / playlist["input"]["path"]
    assert stored.is_file() and stored.stat().st_size == playlist["input"]["size"]

    status = stack.cli("status", playlist["id"]).stdout
    assert f"url:      {urls[0]}" in status and f"stage:    {MEDIA_URL.name} done by cpu-worker" in status
    assert "goes on as transcribe (audio) on gpu" in status
    # Each stage started on its own worker (and reported its own progress while it ran).
    assert re.search(r"started\s+cpu-worker", status) and re.search(r"started\s+gpu-worker", status)
    assert "source:   speech; subtitles: none" in status
    status = stack.cli("status", page["id"]).stdout
    assert "stage:    web done by cpu-worker" in status and "goes on as media_url on cpu" in status
    assert "subtitles: en" in status

    assert private["state"] == "failed" and private["error"].startswith(f"media_url stage: {urls[2]}: ")
    assert "localhost resolves to a private address" in private["error"]
    assert long["state"] == "failed"
    assert long["error"] == (
        f"media_url stage: {urls[3]}: 45s of media, longer than the 40s allowed (MORAG_MEDIA_MAX_DURATION_S)"
    )
    for task in (private, long):  # no download, no output left behind
        assert [p for p in (stack.data_dir / "files" / "tasks" / task["id"]).rglob("*") if p.is_file()] == []
    assert [p.name for p in worker_temp.iterdir() if p.name.startswith("morag-")] == []
    # yt-dlp ran on the CPU worker, never on the server; the worker's proxy refused localhost.
    ran = '"logger": "pipeline.processors.media_urls"'
    assert ran in stack.log("cpu-worker") and ran not in stack.log("server")
    assert '"msg": "proxy refused a request"' in stack.log("cpu-worker")
