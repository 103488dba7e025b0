"""Dead letters: listed with their reason, shown, purged, and retried once the cause is fixed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.chaos.conftest import events, submit, task, wait_consumers, wait_for
from tests.conftest import SPOKEN_WORDS, Stack, queue_depth

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def test_dead_letter_retry_after_a_fix(stack: Stack, samples: Path) -> None:
    stack.start_server()
    # A misconfigured GPU worker: its Whisper model does not exist, so every task fails at once.
    stack.start_worker("gpu", MORAG_WHISPER_MODEL="/srv/models/missing")
    wait_consumers(stack, "gpu")

    first = submit(stack, samples / "speech.mp3")["id"]
    second = submit(stack, samples / "talk.mp4")["id"]
    for task_id in (first, second):
        failed = wait_for(
            "the task to fail", lambda tid=task_id: (t := task(stack, tid))["state"] == "failed" and t
        )
        assert "model folder /srv/models/missing does not exist" in failed["error"]
        assert not events(failed, "retrying")  # a missing model is not retried
    url = stack.env["MORAG_BROKER_URL"]
    assert queue_depth(url, "gpu.XQ") == 2

    listing = stack.cli("dead", "list")
    assert listing.returncode == 0, listing.stderr
    assert first in listing.stdout and second in listing.stdout
    assert "gpu.XQ: 2, cpu.XQ: 0, control.XQ: 0" in listing.stdout
    shown = stack.cli("dead", "show", first)
    assert shown.returncode == 0, shown.stderr
    assert "reason      model folder /srv/models/missing does not exist" in shown.stdout
    assert "worker      gpu-worker" in shown.stdout
    # Listing took nothing: the letters are still there, in their order.
    letters = json.loads(stack.cli("dead", "list", "gpu", "--json").stdout)["letters"]
    assert [x["task_id"] for x in letters] == [first, second]

    purged = stack.cli("dead", "purge", "gpu", "--id", second)
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.strip() == "purged 1 dead letter(s)"
    assert queue_depth(url, "gpu.XQ") == 1

    # Nothing to run the retry yet would fail again: fix the worker first.
    stack.stop("gpu-worker")
    stack.start_worker("gpu")
    wait_consumers(stack, "gpu")
    retried = stack.cli("dead", "retry", "gpu")
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.strip() == f"retried {first} (speech.mp3) on gpu"
    assert task(stack, first)["state"] in {"queued", "running", "done"}

    done = wait_for("the retried task", lambda: (t := task(stack, first))["state"] == "done" and t)
    history = [e["event"] for e in done["events"]]
    assert history == ["submitted", "published", "started", "failed", "requeued", "started", "done"], history
    assert events(done, "requeued")[0]["detail"]["from"] == "gpu.XQ"
    result = stack.get(f"/api/v1/tasks/{first}/result").text.lower()
    assert all(word in result for word in SPOKEN_WORDS), result
    assert queue_depth(url, "gpu.XQ") == 0
    assert task(stack, second)["state"] == "failed"  # purged, not retried
    audited = [json.loads(line)["event"] for line in (stack.data_dir / "audit.log").read_text().splitlines()]
    assert "deadletter.retry" in audited and "deadletter.purge" in audited

    nothing = stack.cli("dead", "retry")
    assert nothing.returncode == 0 and nothing.stdout.strip() == "no dead letters to retry"
    unknown = stack.cli("dead", "list", "gpus")
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == "morag-pipeline: no queue 'gpus'; queues are gpu, cpu, control"
