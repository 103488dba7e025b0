"""The CLI's monitoring views against a running server and workers: ``queues``, the filters of
``workers`` and ``tasks``, and ``watch`` refreshing in place under tmux (read with capture-pane)."""

from __future__ import annotations

import json
import shlex
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import BIN, Stack
from tests.monitoring.conftest import needs

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def cli_json(stack: Stack, *args: str) -> dict:
    proc = stack.cli(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_queues_and_the_filters_of_workers_and_tasks(stack: Stack, samples: Path) -> None:
    stack.start_server()
    stack.start_worker("cpu")
    stack.wait_consumers("cpu")
    done = cli_json(stack, "submit", str(samples / "report.html"))
    assert done["state"] == "done"

    queues = cli_json(stack, "queues")["queues"]
    assert queues["cpu"]["consumers"] == 1 and queues["cpu"]["live_workers"] == 1
    assert queues["cpu"]["messages"] == 0 and queues["cpu"]["drain_s"] == 0
    assert queues["gpu"]["consumers"] == 0 and queues["gpu"]["live_workers"] == 0
    assert queues["control"]["consumers"] == 1  # the server's control consumer
    assert set(queues["cpu"]["rates"]) == {"publish", "deliver", "ack"}
    shown = stack.cli("queues")
    assert shown.returncode == 0 and "time to drain" in shown.stdout and "cpu" in shown.stdout

    assert [w["id"] for w in cli_json(stack, "workers", "--capability", "cpu")["workers"]] == ["cpu-worker"]
    assert cli_json(stack, "workers", "--capability", "gpu")["workers"] == []
    assert [w["id"] for w in cli_json(stack, "workers", "--queue", "cpu")["workers"]] == ["cpu-worker"]

    def ids(*filters: str) -> list[str]:
        return [t["id"] for t in cli_json(stack, "tasks", *filters)["tasks"]]

    assert ids("--kind", "convert") == [done["id"]]
    assert ids("--kind", "transcribe") == []
    assert ids("--worker", "cpu-worker", "--state", "done") == [done["id"]]
    assert ids("--worker", "gpu-box-1") == []
    assert ids("--queue", "gpu") == []


def capture(socket: str) -> str:
    shown = subprocess.run(["tmux", "-L", socket, "capture-pane", "-p", "-t", "watch"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    return shown.stdout


def wait_screen(socket: str, wanted: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = capture(socket)
        if wanted in screen:
            return screen
        time.sleep(0.3)
    raise AssertionError(f"{wanted!r} never shown; the pane holds:\n{screen}")


def test_watch_redraws_workers_queues_and_tasks_in_place(stack: Stack, samples: Path, tmp_path: Path) -> None:
    needs("tmux")
    stack.start_server()
    stack.start_worker("cpu")
    stack.wait_consumers("cpu")
    script = tmp_path / "watch.sh"
    # The terminal's own size, not one this test's environment names.
    env = {k: v for k, v in stack.env.items() if k not in ("COLUMNS", "LINES")}
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    # The terminal's size and the command's errors are kept for a failure's message.
    watch = f"{BIN / 'morag-pipeline'} watch --interval 0.5 2> {tmp_path / 'watch.err'}"
    script.write_text(f"{exports}stty size > {tmp_path / 'size'}; {watch}\n")
    socket = f"morag-{uuid.uuid4().hex[:8]}"
    subprocess.run(["tmux", "-L", socket, "new-session", "-d", "-s", "watch", "-x", "200", "-y", "60",
                    f"bash {script}"], check=True)  # fmt: skip
    try:
        screen = wait_screen(socket, "cpu-worker")
        assert "Workers" in screen and "Queues" in screen and "Running tasks (0)" in screen
        assert "alive" in screen

        stack.stop("cpu-worker")  # its goodbye: the view shows it gone without being restarted
        screen = wait_screen(socket, "gone")
        assert "never (no live worker)" not in screen  # nothing waits on cpu
        stack.cli("submit", "--no-wait", str(samples / "report.html"))
        screen = wait_screen(socket, "never (no live worker)")
        # Redrawn in place: each frame replaces the last, so the title is on the screen once.
        assert screen.count("morag-pipeline at ") == 1, screen
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], check=False)
