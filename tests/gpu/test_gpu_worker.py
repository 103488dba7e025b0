"""An enrolled GPU worker, started as an operator starts one on a GPU box, transcribes and says where.

``test_an_enrolled_gpu_worker_transcribes_on_cuda`` needs a CUDA device (marked
``gpu``; run by ``tests/gpu/gpu_check.sh``). Its twin on the CPU runs the same
steps everywhere, so all of the flow but the device itself is checked on every
machine. A third test starts a GPU worker whose CUDA libraries are missing: it
says so at boot, in its heartbeat (``workers``), and in the reason its tasks move
to ``cpu``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SPOKEN_WORDS, Stack, wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

GPU_WORKER = "gpu-worker"


def worker_record(stack: Stack, name: str = GPU_WORKER) -> dict[str, Any] | None:
    """The worker as ``morag-pipeline workers ID --json`` shows it, once it has sent a heartbeat."""
    proc = stack.cli("workers", name, "--json")
    if proc.returncode != 0:
        return None
    record = json.loads(proc.stdout)
    return record if record.get("state") == "alive" and "cuda" in record.get("hardware", {}) else None


def transcribe_on_enrolled_gpu_worker(
    stack: Stack, samples: Path, **worker_env: str
) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Start the server and an enrolled GPU worker, submit talk.mp4 to the GPU queue
    (``--gpu require``: never moved to a CPU worker) and wait for it.

    Returns the task as ``submit --json`` prints it, ``status``'s output for it and
    the worker's record as ``workers ID --json`` shows it.
    """
    stack.start_server()
    stack.start_worker("gpu", name=GPU_WORKER, **worker_env)
    stack.wait_consumers("gpu")
    wait_for("the GPU worker's first heartbeat", lambda: worker_record(stack), stack=stack)
    proc = stack.cli("submit", "--json", "--gpu", "require", str(samples / "talk.mp4"), timeout=600)
    assert proc.returncode == 0, proc.stderr + stack.all_logs()
    task = json.loads(proc.stdout)
    status = stack.cli("status", task["id"])
    assert status.returncode == 0, status.stderr
    record = worker_record(stack)
    assert record is not None
    return task, status.stdout, record


def heard_the_words(task: dict[str, Any]) -> None:
    text = task["text"].lower()
    for word in SPOKEN_WORDS:
        assert word in text, f"{word!r} not in {text!r}"


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_device")
def test_an_enrolled_gpu_worker_transcribes_on_cuda(stack: Stack, samples: Path) -> None:
    task, status, record = transcribe_on_enrolled_gpu_worker(stack, samples)  # device auto
    assert task["state"] == "done" and task["worker"] == GPU_WORKER
    assert task["result"]["device"] == "cuda"
    # batched on CUDA by default, its batch size chosen from the free VRAM
    assert re.search(r"ran on:   cuda with tiny\.en \(float16, batched by \d+\)", status), status
    heard_the_words(task)
    cuda = record["hardware"]["cuda"]
    assert (cuda["wanted"], cuda["usable"], cuda["problems"]) == (True, True, [])
    assert '"msg": "CUDA ready"' in stack.log(GPU_WORKER)


def test_an_enrolled_gpu_worker_on_the_cpu_says_it_ran_on_cpu(stack: Stack, samples: Path) -> None:
    task, status, record = transcribe_on_enrolled_gpu_worker(stack, samples, MORAG_WHISPER_DEVICE="cpu")
    assert task["state"] == "done" and task["worker"] == GPU_WORKER
    assert task["route"]["queue"] == "gpu"
    assert task["result"]["device"] == "cpu"
    # int8, with as many CPU threads as the machine has cores for its one transcription at a time
    cores = os.cpu_count() or 1
    threads = f"{cores} CPU thread{'s' if cores != 1 else ''}"
    assert f"ran on:   cpu with tiny.en (int8, {threads})" in status, status
    heard_the_words(task)
    assert record["capability"] == "gpu"
    assert record["hardware"]["cuda"]["wanted"] is False  # told to use the CPU: nothing to report
    assert "CUDA unusable" not in stack.log(GPU_WORKER)


def test_a_gpu_worker_without_its_cuda_libraries_says_so(stack: Stack, samples: Path, tmp_path: Path) -> None:
    # The worker is told to load CTranslate2's CUDA libraries from a folder that has none:
    # what a box installed without the gpu extra's NVIDIA packages looks like, on any machine.
    empty = tmp_path / "no-cuda-libraries"
    empty.mkdir()
    stack.start_server()
    stack.start_worker(
        "gpu", name=GPU_WORKER, MORAG_WHISPER_DEVICE="cuda", MORAG_CUDA_LIBRARY_PATH=str(empty)
    )
    stack.start_worker("cpu", MORAG_WHISPER_DEVICE="cpu")
    stack.wait_consumers("gpu")
    stack.wait_consumers("cpu")

    # At boot, in the log: an error naming the library and where it was looked for.
    def boot_error() -> dict[str, Any] | None:
        for line in stack.log(GPU_WORKER).splitlines():
            if line.startswith("{") and "CUDA unusable" in line:
                return json.loads(line)
        return None

    logged = wait_for("the boot error in the GPU worker's log", boot_error, stack=stack)
    assert logged["level"] == "error" and logged["worker"] == GPU_WORKER
    assert any(f"libcublas.so.12 not found in {empty}" in p for p in logged["problems"]), logged

    # In the registry, as `morag-pipeline workers ID --json` shows it.
    record = wait_for("the GPU worker's heartbeat", lambda: worker_record(stack), stack=stack)
    cuda = record["hardware"]["cuda"]
    assert cuda["wanted"] is True and cuda["usable"] is False
    assert "libcublas.so.12" in cuda["libraries"]["missing"]
    assert any("pip install 'morag-pipeline[gpu]'" in p for p in cuda["problems"])
    # In `workers` (the GPU column and the worker's page) and the server's /healthz.
    listing = stack.cli("workers").stdout
    assert "CUDA unusable" in listing, listing
    page = stack.cli("workers", GPU_WORKER).stdout
    assert any(
        line.strip().startswith("cuda:") and "libcublas.so.12" in line for line in page.splitlines()
    ), page
    [unusable] = stack.get("/healthz").json()["parts"]["gpu_workers"]["cuda_unusable"]
    assert unusable["worker"] == GPU_WORKER and unusable["problems"] == cuda["problems"]

    # Its task moves to a CPU worker, and the reason names the missing library.
    proc = stack.cli("submit", "--json", str(samples / "talk.mp4"), timeout=600)
    assert proc.returncode == 0, proc.stderr + stack.all_logs()
    task = json.loads(proc.stdout)
    assert task["state"] == "done" and task["worker"] == "cpu-worker"
    heard_the_words(task)
    status = stack.cli("status", task["id"]).stdout
    assert "ran on:   cpu with tiny.en" in status
    [moved] = [line for line in status.splitlines() if " rerouted " in line]
    assert "cannot load tiny.en on the GPU: CUDA libraries for CTranslate2:" in moved
    assert f"libcublas.so.12 not found in {empty}" in moved
