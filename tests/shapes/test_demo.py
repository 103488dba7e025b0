"""ops/demo.sh itself, and the lines it tells a new user to try next: every task ends."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, fresh_vhost
from tests.shapes.conftest import Network, Shape, check_every_task_ended, open_shape

pytestmark = [pytest.mark.shapes, pytest.mark.slow, pytest.mark.rabbitmq]


@pytest.fixture
def demo_shape(tmp_path: Path, rabbitmq_available: None) -> Iterator[Shape]:
    """The environment of ops/demo.sh run in a test: its own vhost, ports and folders. The demo
    starts the processes; the Shape only reads the server's API (with the demo's admin key)."""
    with fresh_vhost() as url, open_shape(tmp_path, url, Network(None, "127.0.0.1")) as shape:
        yield shape


def demo_env(shape: Shape, run: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MORAG_")}
    port = free_port()
    env.update(
        DEMO_RUN_DIR=str(run),
        DEMO_SKIP_SETUP="1",  # the checkout is set up; the demo must not reinstall it
        MORAG_BROKER_URL=shape.stack.env["MORAG_BROKER_URL"],
        MORAG_API_PORT=str(port),
        MORAG_SERVER_URL=f"http://127.0.0.1:{port}",
        MORAG_SFTP_PORT=str(free_port()),
        MORAG_DATA_DIR=str(run / "data"),
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.mark.timeout(600)
def test_the_demo_and_the_lines_it_suggests(demo_shape: Shape, tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = demo_env(demo_shape, run)
    demo = subprocess.Popen(
        ["ops/demo.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        try:
            printed, _ = demo.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            demo.kill()
            printed, _ = demo.communicate()
            raise AssertionError(f"ops/demo.sh did not finish:\n{printed}\n{_run_logs(run)}") from None
        assert demo.returncode == 0, f"ops/demo.sh exited {demo.returncode}:\n{printed}\n{_run_logs(run)}"

        # What the demo printed next: run each "Try" line as a user pastes it.
        lines = printed.splitlines()
        start = next(n for n, line in enumerate(lines) if line.startswith("Try ("))
        stop = next(n for n, line in enumerate(lines) if line.startswith("Stop everything"))
        tries = [line.strip() for line in lines[start + 1 : stop] if line.strip()]
        assert [t.split()[1] for t in tries] == ["submit", "tasks", "workers"], tries
        env["MORAG_API_KEY"] = (run / "api-key").read_text().strip()
        outcomes = []
        for line in tries:
            try:
                done = subprocess.run(shlex.split(line), cwd=ROOT, env=env, capture_output=True, text=True,
                                      timeout=180)  # fmt: skip
            except subprocess.TimeoutExpired:
                raise AssertionError(f"`{line}` did not return within 3 minutes\n{_run_logs(run)}") from None
            outcomes.append((line, done.returncode, done.stdout + done.stderr))
        for line, code, text in outcomes:
            assert code == 0, f"`{line}` exited {code}:\n{text}\n{_run_logs(run)}"

        # Every task the demo and its lines made ended, read with the demo's own key.
        demo_shape.stack.env.update(MORAG_API_KEY=env["MORAG_API_KEY"])
        demo_shape.stack.url = env["MORAG_SERVER_URL"]
        demo_shape.stack.data_dir = run / "data"
        with demo_shape.api as api:
            listed = api.get("/api/v1/tasks", params={"limit": 100}).raise_for_status().json()["tasks"]
        ids = [t["id"] for t in listed]
        assert len(ids) == 2, [(t["filename"], t["state"]) for t in listed]
        tasks = check_every_task_ended(demo_shape, "the demo and its Try lines", ids, timeout=60)
        assert sorted(t["filename"] for t in tasks.values()) == ["report.html", "talk.mp4"]
        assert all(t["state"] == "done" for t in tasks.values()), {
            t["filename"]: t["error"] for t in tasks.values()
        }
    finally:
        subprocess.run(["ops/stop.sh", "--quiet"], cwd=ROOT, env=env, timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(demo.pid, signal.SIGKILL)  # anything the demo left in its session


def _run_logs(run: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(run.glob("*.log"))
    )
