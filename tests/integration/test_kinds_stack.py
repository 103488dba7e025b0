"""Web pages, media URLs and images through a real server and an enrolled CPU worker (files over
SFTP): the worker fetches, the server never does; a recording a URL answers with is stored and
transcribed as the task's second stage, shown by ``status``; a bad URL, or one that answers with
a file no kind takes, leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.kinds import IMAGE, TRANSCRIBE, WEB
from tests.conftest import SPOKEN_WORDS, Stack
from tests.processors.test_images import WORDS, render
from tests.web_pages import local_site

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def test_a_cpu_worker_fetches_pages_and_recordings_and_reads_images(stack: Stack, tmp_path: Path) -> None:
    stack.env["MORAG_FETCH_ALLOW_HOSTS"] = "127.0.0.1"
    stack.start_server()
    worker_temp = tmp_path / "worker-temp"
    worker_temp.mkdir()
    stack.start_worker("cpu", TMPDIR=str(worker_temp))
    stack.wait_consumers("cpu")
    photo = render(tmp_path / "invoice.png")
    with local_site() as site:
        urls = [
            f"{site}/{path}" for path in ("news/gpu-farms.html", "talks/speech.mp3", "missing", "data.bin")
        ]
        proc = stack.cli("submit", "--json", *urls, str(photo), timeout=300)
    assert proc.returncode == 1, proc.stderr
    article, speech, missing, data, image = json.loads(proc.stdout)

    assert (article["kind"], article["state"], article["worker"]) == (WEB.name, "done", "cpu-worker")
    assert "- Author: Ada Lovelace" in article["text"]
    assert (image["kind"], image["state"], image["route"]["queue"]) == (IMAGE.name, "done", "cpu")
    assert all(line in image["text"] for line in WORDS)

    assert (speech["kind"], speech["state"]) == (TRANSCRIBE.name, "done"), speech.get("error")
    assert all(word in speech["text"].lower() for word in SPOKEN_WORDS)
    assert speech["route"]["queue"] == "cpu" and "no GPU worker is connected" in speech["route"]["reasons"][0]
    stored = stack.data_dir / "files" / speech["input"]["path"]
    assert stored.read_bytes() == (Path(__file__).parents[2] / "samples" / "speech.mp3").read_bytes()
    status = stack.cli("status", speech["id"])
    assert f"url:      {urls[1]}" in status.stdout and "stage:    web done by cpu-worker" in status.stdout
    assert "stage done" in status.stdout and "goes on as transcribe (audio) on cpu" in status.stdout

    assert missing["state"] == "failed" and "HTTP 404 Not Found" in missing["error"]
    assert data["state"] == "failed" and data["error"].startswith("web stage: data.bin: unsupported content")
    for task in (missing, data):  # no download, no output left behind
        assert [p for p in (stack.data_dir / "files" / "tasks" / task["id"]).rglob("*") if p.is_file()] == []
    assert [p.name for p in worker_temp.iterdir() if p.name.startswith("morag-")] == []
    # The worker fetched every URL; the server none.
    assert all(f"GET {url}" in stack.log("cpu-worker") for url in urls)
    assert f"GET {site}" not in stack.log("server")
