"""Two server replicas on one PostgreSQL store and one shared file store: one is killed with
SIGKILL in the middle of a run and started again; workers and the CLI fail over to the other,
every task ends once with one set of outputs, the registry never flaps, and the sweep runs on
one replica at a time."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.outputs import output_name
from pipeline.processors.transcripts import FORMATS
from tests.chaos.conftest import events, submit, wait_consumers, wait_for
from tests.conftest import BIN, Stack, free_port, open_stack

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow, pytest.mark.postgresql]

DOCUMENTS = 180
CLIPS = 20


def healthz(url: str) -> dict[str, Any] | None:
    try:
        response = httpx.get(f"{url}/healthz", timeout=5)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def sweeps(log: str) -> list[tuple[str, float, float]]:
    """Every sweep a replica's log records: (by, started, ended)."""
    found = []
    for line in log.splitlines():
        if '"sweep ran"' not in line:
            continue
        record = json.loads(line[line.index("{") :])
        found.append((record["by"], record["started"], record["started"] + record["seconds"]))
    return found


def pid_of(by: str) -> int:
    return int(re.search(r"pid (\d+)$", by).group(1))  # type: ignore[union-attr]


@pytest.mark.timeout(1200)
def test_a_replica_killed_mid_run_loses_and_doubles_nothing(
    tmp_path: Path, vhost: str, postgres_url: str, samples: Path, request: pytest.FixtureRequest
) -> None:
    shared = tmp_path / "shared"  # the folder every replica mounts (NFS in production)
    shared.mkdir()
    a_sftp, b_sftp, b_api = free_port(), free_port(), free_port()
    env = {
        "MORAG_DATABASE_URL": postgres_url,
        "MORAG_FILES_DIR": str(shared / "files"),
        "MORAG_SFTP_SERVER_KEY_FILE": str(shared / "sftp_host_ed25519_key"),
        "MORAG_SFTP_PORT": str(a_sftp),
        # What `token issue` writes into each worker's settings: both replicas' SFTP servers.
        "MORAG_SFTP_HOST": f"127.0.0.1:{a_sftp},127.0.0.1:{b_sftp}",
    }
    with open_stack(tmp_path, vhost, request, env=env) as stack:
        a_url, b_url = stack.url, f"http://127.0.0.1:{b_api}"
        stack.env["MORAG_SERVER_URL"] = f"{a_url},{b_url}"  # the CLI's list of replicas
        stack.start_server()
        wait_for("replica A leads the sweeps", lambda: "liveness scheduler running" in stack.log("server"))
        b_env = {"MORAG_DATA_DIR": str(tmp_path / "data-b"), "MORAG_API_PORT": str(b_api),
                 "MORAG_SFTP_PORT": str(b_sftp)}  # fmt: skip
        stack.spawn("server-b", [str(BIN / "morag-pipeline"), "server"], **b_env)
        wait_for("replica B up", lambda: healthz(b_url), stack=stack)
        wait_for("B stands by", lambda: "stands by to take over" in stack.log("server-b"), stack=stack)
        assert healthz(a_url)["parts"]["replicas"]["running"] == 2  # type: ignore[index]

        # Sweeps asked of both replicas all along: only the leader's liveness process runs them.
        stop = threading.Event()

        def ask_for_sweeps() -> None:
            while not stop.wait(2):
                for url in (a_url, b_url):
                    with contextlib.suppress(httpx.HTTPError):
                        httpx.post(f"{url}/api/v1/workers/sweep", headers=stack.headers, timeout=5)

        asker = threading.Thread(target=ask_for_sweeps, daemon=True)
        asker.start()

        docs = tmp_path / "docs"
        docs.mkdir()
        expected: dict[str, list[str]] = {}
        for n in range(DOCUMENTS + CLIPS):
            via = stack if n % 2 == 0 else Stack(stack.env, stack.data_dir, stack.logs, url=b_url)
            if n < DOCUMENTS:
                path = docs / f"doc-{n:03}.md"
                path.write_text(f"# Document {n}\n\n" + f"Paragraph {n} of the failover test.\n\n" * 20)
                outputs = [f"doc-{n:03}.json", f"doc-{n:03}.md"]
            else:
                path = docs / f"clip-{n:03}.mp3"
                path.write_bytes((samples / "speech.mp3").read_bytes())
                outputs = [output_name(path.name, fmt) for fmt in FORMATS]
            form = {"gpu": "require"} if n >= DOCUMENTS else {}  # the GPU box is not up yet
            expected[submit(via, path, **form)["id"]] = sorted([".manifest.json", *outputs])

        # The workers start once every task is queued, so that the kill finds most of them waiting.
        stack.start_worker("gpu", "gpu-box")
        stack.start_worker("cpu", "cpu-box", threads=2)
        wait_consumers(stack, "gpu")
        wait_consumers(stack, "cpu")
        wait_consumers(stack, "control", 2)

        def counts(url: str = b_url) -> dict[str, int]:
            return httpx.get(f"{url}/api/v1/tasks", params={"limit": 1}, headers=stack.headers,
                             timeout=30).json()["counts"]  # fmt: skip

        wait_for("the first tasks done", lambda: counts()["done"] >= 20, stack=stack)
        done_at_kill = counts()["done"]
        killed = stack.processes["server"].pid
        stack.stop("server", sig=signal.SIGKILL)  # and its liveness process: the machine is gone
        killed_at = time.time()
        assert done_at_kill < len(expected), "the run ended before the kill could test anything"

        # The CLI fails over to B by itself.
        status = stack.cli("status", "--json", next(iter(expected)))
        assert status.returncode == 0, status.stderr
        late = docs / "late.md"
        late.write_text("# Late\n\nSubmitted while replica A was down.\n")
        sent = stack.cli("submit", "--json", "--priority", "urgent", str(late), timeout=600)
        assert sent.returncode == 0, sent.stderr
        answer = json.loads(sent.stdout)
        answer = answer[0] if isinstance(answer, list) else answer
        assert answer["state"] == "done", answer
        expected[answer["id"]] = [".manifest.json", "late.json", "late.md"]
        wait_for("B leads the sweeps", lambda: "liveness scheduler running" in stack.log("server-b"),
                 stack=stack)  # fmt: skip

        # A comes back with no manual step and rejoins as a standby.
        stack.start_server()
        wait_for("two replicas again", lambda: healthz(b_url)["parts"]["replicas"]["running"] == 2,
                 stack=stack)  # fmt: skip
        wait_for("every task ended", lambda: counts()["done"] == len(expected), timeout=900, stack=stack)
        stop.set()
        asker.join()

        assert counts(a_url) == {"queued": 0, "running": 0, "done": len(expected), "failed": 0,
                                 "canceled": 0}  # fmt: skip
        for task_id, names in expected.items():
            task = stack.get(f"/api/v1/tasks/{task_id}", timeout=30).json()
            assert task["state"] == "done", task
            assert len(events(task, "done")) == 1, task["events"]
            folder = shared / "files" / "tasks" / task_id / "output"
            assert sorted(p.name for p in folder.iterdir()) == names

        # Workers reached B's SFTP server once A's was gone, and said so.
        worker_logs = stack.log("gpu-box") + stack.log("cpu-box")
        assert "sftp server not answering; trying the next one" in worker_logs

        # The registry never flapped: each box joined once and was never stale, dead or revived.
        for name in ("gpu-box", "cpu-box"):
            history = [e["event"] for e in stack.get(f"/api/v1/workers/{name}").json()["history"]]
            assert history.count("joined") == 1, history
            flaps = {"stale", "dead", "revived", "process stale", "process dead", "process revived"}
            assert not flaps & set(history), history

        # The sweep ran on one replica at a time: A until it was killed, then B.
        ran = sweeps(stack.log("server")) + sweeps(stack.log("server-b"))
        ran.sort(key=lambda sweep: sweep[1])
        for before, after in zip(ran, ran[1:], strict=False):
            assert before[2] <= after[1] or before[0] == after[0], f"two replicas swept at once: {ran}"
        by_a = [s for s in ran if pid_of(s[0]) == killed]
        after_kill = [s for s in ran if s[1] > killed_at]
        assert by_a and all(s[1] < killed_at for s in by_a), ran
        assert after_kill and all(pid_of(s[0]) != killed for s in after_kill), ran
        print(f"\n{done_at_kill} of {len(expected)} done at the kill; {len(ran)} sweeps, "
              f"{len(by_a)} by A before it, {len(after_kill)} after")  # fmt: skip
