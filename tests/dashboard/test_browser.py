"""The dashboard in real headless Chromium, against a server and workers started as users start them.

One story, a screenshot at each step (in the test's ``screenshots`` folder):
the page asks for a key; a readonly key sees both workers, the queues and the
tasks; the page follows a worker that stops and a task that finishes without
being reloaded; the charts draw the sweep's samples; an admin retries a dead
letter from its page, and the retry is audited.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.conftest import submit, task, wait_consumers
from tests.conftest import Stack, queue_depth, wait_for
from tests.dashboard.conftest import Screens

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

#: How long the page may take to show a change (it polls every two seconds; workers beat every few).
SHOWN_WITHIN_MS = 60_000


def row(page: Any, kind: str, name: str) -> Any:
    return page.locator(f'tr[data-{kind}="{name}"]')


def log_in(page: Any, key: str) -> None:
    page.fill("#key", key)
    page.click("#login-form button[type=submit]")


def test_the_dashboard_shows_the_fleet_live_and_an_admin_retries_a_dead_letter(
    stack: Stack, samples: Path, chromium: Any, screens: Screens
) -> None:
    stack.start_server()
    # A misconfigured GPU box (its model is missing: every task fails at once, to the dead
    # letters) and a CPU box, each enrolled like a remote machine.
    stack.start_worker("gpu", MORAG_WHISPER_MODEL="/srv/models/missing")
    stack.start_worker("cpu")
    wait_consumers(stack, "gpu")
    wait_consumers(stack, "cpu")
    readonly = stack.cli("apikey", "create", "--name", "watcher", "--role", "readonly")
    assert readonly.returncode == 0, readonly.stderr
    readonly_key = readonly.stdout.strip().splitlines()[-1]
    admin_key = stack.env["MORAG_API_KEY"]

    doomed = submit(stack, samples / "speech.mp3")["id"]  # to the GPU box, which fails it
    document = submit(stack, samples / "report.html")["id"]  # to the CPU box
    wait_for("the GPU task to fail", lambda: task(stack, doomed)["state"] == "failed", 120, stack)
    wait_for("the document", lambda: task(stack, document)["state"] == "done", 180, stack)
    assert queue_depth(stack.env["MORAG_BROKER_URL"], "gpu.XQ") == 1

    context = chromium.new_context(viewport={"width": 1500, "height": 1000})
    page = context.new_page()
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    page.on("dialog", lambda dialog: dialog.accept())

    # No key: the page holds no data and asks for one; a wrong one is refused.
    page.goto(f"{stack.url}/dashboard")
    page.wait_for_selector("#login:not([hidden])")
    assert page.locator("#workers").count() == 0
    screens.shoot(page, "login")
    log_in(page, "mpk_000000000000_wrong")
    page.wait_for_selector("#login-error:has-text('not accepted')")
    screens.shoot(page, "wrong-key")

    # A readonly key: both workers, the queues with their depths, and the tasks.
    log_in(page, readonly_key)
    page.wait_for_selector('tr[data-worker="gpu-worker"][data-state="alive"]', timeout=SHOWN_WITHIN_MS)
    page.wait_for_selector('tr[data-worker="cpu-worker"][data-state="alive"]', timeout=SHOWN_WITHIN_MS)
    assert page.locator("#you").inner_text() == "watcher (readonly)"
    # Its failure is counted (done / failed), from its next heartbeat.
    page.wait_for_selector('tr[data-worker="gpu-worker"] td:text-is("0 / 1")', timeout=SHOWN_WITHIN_MS)
    for queue in ("gpu", "cpu", "control"):
        assert row(page, "queue", queue).count() == 1
    page.wait_for_selector('tr[data-queue="gpu"] td.dead:text-is("1")', timeout=SHOWN_WITHIN_MS)
    assert row(page, "queue", "gpu").locator("td.consumers").inner_text() == "1"
    page.wait_for_selector(f'tr[data-task="{doomed}"][data-state="failed"]')
    done_row = row(page, "task", document)
    assert done_row.get_attribute("data-state") == "done"
    assert "cpu" in done_row.locator("td.route").inner_text()
    assert done_row.locator("a.output").count() >= 1  # links to its outputs
    page.wait_for_selector("#dead-body tr[data-letter]", timeout=SHOWN_WITHIN_MS)
    assert doomed[:8] in page.locator("#dead-body").inner_text()
    page.evaluate("window.notReloaded = true")
    screens.shoot(page, "overview-readonly")

    # Filters: by state, then by worker.
    page.select_option("#filter-state", "failed")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#tasks-body tr[data-task]')]"
        ".every(r => r.dataset.state === 'failed')"
    )
    assert row(page, "task", document).count() == 0
    page.select_option("#filter-state", "")
    page.select_option("#filter-worker", "cpu-worker")
    page.wait_for_function(f"() => !document.querySelector('tr[data-task=\"{doomed}\"]')")
    assert row(page, "task", document).count() == 1
    page.select_option("#filter-worker", "")
    screens.shoot(page, "filtered")

    # The GPU box stops: its row says so without a reload.
    stack.stop("gpu-worker")
    page.wait_for_selector('tr[data-worker="gpu-worker"][data-state="gone"]', timeout=SHOWN_WITHIN_MS)
    page.wait_for_selector('tr[data-queue="gpu"] td.consumers:text-is("0")', timeout=SHOWN_WITHIN_MS)
    # Work that needs the GPU waits in its queue meanwhile: its depth, by priority.
    waiting = submit(stack, samples / "speech.mp3", gpu="require", priority="high")["id"]
    page.wait_for_selector('tr[data-queue="gpu"] td.depth:text-is("1")', timeout=SHOWN_WITHIN_MS)
    assert "high: 1" in row(page, "queue", "gpu").inner_text()
    assert "not while nothing consumes it" in row(page, "queue", "gpu").locator("td.drain").inner_text()
    assert page.evaluate("window.notReloaded") is True
    screens.shoot(page, "gpu-worker-stopped")

    # A task submitted now appears, and its row turns done without a reload.
    later = submit(stack, samples / "report.html")["id"]
    page.wait_for_selector(f'tr[data-task="{later}"]', timeout=SHOWN_WITHIN_MS)
    page.wait_for_selector(f'tr[data-task="{later}"][data-state="done"]', timeout=SHOWN_WITHIN_MS * 3)
    assert page.evaluate("window.notReloaded") is True
    screens.shoot(page, "task-finished")

    # Charts: each sweep writes a sample to the store; the page draws them.
    for _ in range(2):
        before = len(history(stack))
        assert stack.post("/api/v1/workers/sweep").status_code == 202
        wait_for("a history sample", lambda n=before: len(history(stack)) > n, 90, stack)
    points = history(stack)
    ended = {s: sum(p["queues"][q][s] for p in points for q in ("gpu", "cpu")) for s in ("done", "failed")}
    assert ended == {"done": 2, "failed": 1}  # both documents, the doomed transcription
    assert points[-1]["queues"]["gpu"]["messages"] == 1  # the task waiting for a GPU
    # The server's own sweeps may add samples meanwhile: the page draws at least these.
    page.wait_for_function(
        f"() => Number(document.querySelector('#charts').dataset.points) >= {len(points)}", timeout=60_000
    )
    for chart in ("throughput", "depth", "share"):
        assert page.locator(f"#chart-{chart} polyline").count() == 2
    screens.shoot(page, "charts")

    # The dead letter's page: readonly sees it, without the admin's buttons.
    page.goto(f"{stack.url}/dashboard/dead/{doomed}")
    page.wait_for_selector("#deadletter[data-count='1']")
    assert "model folder /srv/models/missing does not exist" in page.locator("#deadletter").inner_text()
    assert page.locator("#retry").count() == 0
    screens.shoot(page, "dead-letter-readonly")

    # The GPU box comes back fixed; an admin retries the letter from its page.
    stack.start_worker("gpu")
    wait_consumers(stack, "gpu")
    page.click("#logout")
    page.wait_for_selector("#login:not([hidden])")
    log_in(page, admin_key)
    page.wait_for_selector("#retry")
    page.click("#retry")
    page.wait_for_selector("#action-result:has-text('retried 1')")
    page.wait_for_selector("#deadletter[data-count='0']", timeout=SHOWN_WITHIN_MS)
    screens.shoot(page, "dead-letter-retried")

    # The retried task's page follows it to done, without a reload.
    page.goto(f"{stack.url}/dashboard/tasks/{doomed}")
    page.wait_for_selector("#task")
    page.evaluate("window.notReloaded = true")
    page.wait_for_selector("#task[data-state='done']", timeout=SHOWN_WITHIN_MS * 3)
    assert page.evaluate("window.notReloaded") is True
    text = page.locator("#task").inner_text()
    assert "requeued" in text and "gpu" in text
    screens.shoot(page, "retried-task-done")

    audited = [json.loads(line) for line in (stack.data_dir / "audit.log").read_text().splitlines()]
    retries = [e for e in audited if e["event"] == "deadletter.retry"]
    assert retries and retries[-1]["by"] == "tests" and len(retries[-1]["retried"]) == 1
    wait_for("the task that waited for a GPU", lambda: task(stack, waiting)["state"] == "done", 180, stack)
    context.close()

    for key in (readonly_key, admin_key):
        assert not [u for u in urls if key in u], "a key was sent in a URL"
        assert not [p.name for p in stack.logs.glob("*.log") if key in p.read_text(errors="replace")]
    assert len(screens.taken) == 10
    assert all(re.fullmatch(r"\d\d-[a-z-]+\.png", p.name) and p.stat().st_size > 0 for p in screens.taken)


def history(stack: Stack) -> list[dict[str, Any]]:
    return stack.get("/api/v1/dashboard/history").json()["points"]
