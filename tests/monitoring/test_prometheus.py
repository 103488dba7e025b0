"""``/metrics`` scraped by a real Prometheus server: the values it stores match the task store,
before and after a server restart; the shipped rules pass promtool and evaluate on them."""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from pipeline.store import TaskStore
from tests.conftest import Stack, queue_depth
from tests.monitoring.conftest import RULES, needs, prometheus

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def first(output: str) -> dict:
    """The first task ``submit --json`` printed (one file: an object; several: a list)."""
    found = json.loads(output)
    return found[0] if isinstance(found, list) else found


def readonly_key(stack: Stack) -> str:
    made = stack.cli("apikey", "create", "--name", "prometheus", "--role", "readonly")
    assert made.returncode == 0, made.stderr
    return made.stdout.strip().splitlines()[-1]


def test_prometheus_scrapes_metrics_that_match_the_store_across_a_restart(
    stack: Stack, samples: Path, tmp_path: Path
) -> None:
    stack.start_server()
    key = readonly_key(stack)
    assert httpx.get(f"{stack.url}/metrics", timeout=10).status_code == 401  # the readonly role is needed
    stack.start_worker("cpu")  # enrolled: its files go over SFTP
    stack.wait_consumers("cpu")
    done = stack.cli("submit", "--json", str(samples / "report.html"))
    assert done.returncode == 0, done.stderr
    done_id = first(done.stdout)["id"]
    stack.stop("cpu-worker")  # says goodbye: the cpu queue has no live worker
    waiting = stack.cli("submit", "--no-wait", "--json", str(samples / "report.html"))
    assert waiting.returncode == 0, waiting.stderr

    store = TaskStore(stack.data_dir / "tasks.db")
    task = store.get(done_id, events=False)
    transfer = task.result["transfer"]
    target = stack.url.removeprefix("http://")
    with prometheus(tmp_path / "prometheus", target, key) as prom:
        prom.wait_scraped("morag", after=time.time())
        for state, count in store.counts().items():
            assert prom.value(f'sum(morag_tasks{{state="{state}"}}) or vector(0)') == count, state
        assert prom.value('morag_tasks{state="queued", kind="convert", queue_name="cpu"}') == 1
        assert (
            prom.value('morag_queue_messages{queue_name="cpu"}')
            == queue_depth(stack.env["MORAG_BROKER_URL"], "cpu")
            == 1
        )
        assert prom.value('morag_queue_consumers{queue_name="cpu"}') == 0
        assert prom.value('morag_queue_live_processes{queue_name="cpu"}') == 0
        assert prom.value('morag_workers{capability="cpu", state="gone"}') == 1
        assert math.isinf(prom.value('morag_queue_drain_seconds{queue_name="cpu"}') or 0)  # work, no worker
        assert prom.value('morag_queue_work_seconds{queue_name="cpu"}') == pytest.approx(
            store.get(first(waiting.stdout)["id"], events=False).route["estimates"]["cpu_s"]
        )
        assert prom.value('morag_tasks_finished_total{state="done"}') == 1
        wait = prom.value('morag_task_wait_seconds_sum{queue_name="cpu", kind="convert"}')
        assert wait == pytest.approx(task.started_at - task.created_at)
        processing = task.finished_at - task.started_at - transfer["download_s"] - transfer["upload_s"]
        assert prom.value('morag_task_processing_seconds_sum{queue_name="cpu"}') == pytest.approx(processing)
        assert prom.value('morag_task_processing_seconds_count{queue_name="cpu"}') == 1
        downloaded = prom.value('morag_transfer_bytes_total{direction="download", queue_name="cpu"}')
        assert downloaded == task.input["size"] == transfer["download_bytes"]
        uploaded = prom.value('morag_transfer_bytes_total{direction="upload", queue_name="cpu"}')
        assert uploaded == sum(o["size"] for o in task.outputs) == transfer["upload_bytes"]
        seconds = prom.value('sum(morag_task_transfer_seconds_sum{queue_name="cpu"})')
        assert seconds == pytest.approx(transfer["download_s"] + transfer["upload_s"])
        # The shipped rules evaluate on these metrics: the cpu queue will not drain (pending for 10 minutes).
        assert prom.query('ALERTS{alertname="MoragQueueWillNotDrain", queue_name="cpu"}')

        kept = (
            'morag_tasks_finished_total{state="done"}',
            'sum(morag_tasks{state="queued"})',
            'morag_transfer_bytes_total{direction="download", queue_name="cpu"}',
            'morag_task_processing_seconds_count{queue_name="cpu"}',
        )
        before = {e: prom.value(e) for e in kept}
        stack.stop("server")
        stack.start_server()
        prom.wait_scraped("morag", after=time.time())
        assert {e: prom.value(e) for e in before} == before  # from the store, not from memory


def test_the_shipped_rules_pass_promtool_and_the_no_live_gpu_worker_rule_fires() -> None:
    needs("promtool")
    checked = subprocess.run(
        ["promtool", "check", "rules", str(RULES / "rules.yml")], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 6 rules found" in checked.stdout
    tested = subprocess.run(
        ["promtool", "test", "rules", "tests.yml"], cwd=RULES, capture_output=True, text=True
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # The case that must fire is there: MoragNoLiveGpuWorker with an alert expected.
    cases = (RULES / "tests.yml").read_text()
    assert "alertname: MoragNoLiveGpuWorker\n        exp_alerts:\n          - exp_labels:" in cases
