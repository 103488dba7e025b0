"""Every command of the guides under docs/, run as their readers type them, against a real stack.

One stack serves every page, as ``ops/demo.sh`` starts it: a server with a secret and an
admin key, a GPU-queue worker enrolled like a remote box (token, files over SFTP only) and a
CPU-queue worker on the server's host. Each page gets its own folder and shells:

- ``$`` commands run on "the server's host": a bash in the page's own folder (which holds the
  clone's ``samples/``), with the stack's settings in its environment (``MORAG_SERVER_URL``,
  ``MORAG_API_KEY``, ``MORAG_DATA_DIR``, ``MORAG_BROKER_URL``: a page names them, the runner
  never edits its text).
- ``NAME$`` commands run on the machine NAME: a bash in a folder of its own that is also its
  ``HOME``, with no ``MORAG_`` setting at all, and the checkout's environment on its ``PATH``
  (what ``pip install`` on the box would give it).

The convention is in ``tests/docs/doc_commands.py`` and at the top of each page.
"""

from __future__ import annotations

import os
import shutil
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.api.openapi import render
from tests.conftest import BIN, ROOT, Stack, fresh_vhost, open_stack, wait_for
from tests.docs.doc_commands import (
    SERVER,
    Shell,
    Step,
    missing_output,
    steps,
    unexplained_blocks,
)
from tests.shapes.conftest import delete_broker_user

pytestmark = [pytest.mark.rabbitmq]

DOCS = ROOT / "docs"
#: The pages whose commands this module runs, in the order they are run.
PAGES = ("quickstart.md", "user-guide.md", "operator-guide.md", "worker-sizing.md", "architecture.md")
#: Seconds one command may take (a transcription of a sample, a document's first conversion).
COMMAND_TIMEOUT_S = 180

#: The folder of the server's host in a page's folder (each other machine's is named after it).
SERVER_DIR = "server"
#: What happens between two machines, which a page leaves to the operator (scp and the like, in a
#: ``shell`` block): called with the page's folder when the machine's shell opens.
Arrival = Callable[[Path], None]


def copy_enrollment(folder: Path) -> None:
    """operator-guide.md: ``gpu-box-1.env``, written on the server, is on the box as ``morag.env``."""
    shutil.copy(folder / SERVER_DIR / "gpu-box-1.env", folder / "gpu-box-1" / "morag.env")


#: Per page: what reaches a machine before its first command.
ARRIVALS: dict[str, dict[str, Arrival]] = {"operator-guide.md": {"gpu-box-1": copy_enrollment}}


def page_variables(stack: Stack) -> dict[str, str]:
    """What operator-guide.md asks its reader to set (a ``shell`` block shows example values):
    the server and the broker as a box reaches them."""
    vhost = urllib.parse.urlsplit(stack.env["MORAG_BROKER_URL"]).path
    port = urllib.parse.urlsplit(stack.env["MORAG_BROKER_URL"]).port or 5672
    return {"SERVER_HOST": "127.0.0.1", "BOX_BROKER_URL": f"amqp://127.0.0.1:{port}{vhost}"}


@pytest.fixture(scope="module")
def docs_stack(tmp_path_factory: pytest.TempPathFactory, rabbitmq_available: None) -> Iterator[Stack]:
    """The stack of ops/demo.sh: server, an enrolled GPU-queue worker, a CPU-queue worker."""
    with fresh_vhost() as url, open_stack(tmp_path_factory.mktemp("docs"), url) as stack:
        stack.start_server()
        stack.start_worker("gpu", "demo-gpu")
        stack.start_worker("cpu", "demo-cpu", threads=2, enroll=False, MORAG_FILE_ACCESS="shared")
        stack.wait_consumers("gpu")
        stack.wait_consumers("cpu")
        try:
            yield stack
        finally:
            delete_broker_user("gpu-box-1")  # made by operator-guide.md's token issue --broker-user


def live(stack: Stack, queue: str) -> int:
    """Live worker processes on ``queue``, as the server's registry counts them."""
    return stack.get("/api/v1/workers", timeout=10).json()["queues"].get(queue, {}).get("live", 0)


def option(step: Step, name: str, default: str) -> str:
    """The value of a ``dramatiq`` line's option ``name`` (``--queues``, ``--processes``)."""
    words = step.command.split()
    return words[words.index(name) + 1] if name in words else default


class Page:
    """The machines of one page and the commands run on them.

    Parameters:
      name: the page's file name under docs/.
      stack: the stack it runs against.
      folder: the page's own folder (one sub-folder per machine).
    """

    def __init__(self, name: str, stack: Stack, folder: Path) -> None:
        self.name = name
        self.stack = stack
        self.folder = folder
        self.shells: dict[str, Shell] = {}
        self.arrivals = ARRIVALS.get(name, {})

    def shell(self, host: str) -> Shell:
        if host not in self.shells:
            path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
            home = self.folder / (host or SERVER_DIR)
            home.mkdir(parents=True, exist_ok=True)
            if host == SERVER:
                (home / "samples").symlink_to(ROOT / "samples")
                env = {**self.stack.env, **page_variables(self.stack), "PATH": path}
            else:
                env = {k: v for k, v in os.environ.items() if not k.startswith("MORAG_")}
                env.update(HOME=str(home), PATH=path, PYTHONUNBUFFERED="1")
            if host in self.arrivals:
                self.arrivals[host](self.folder)
            self.shells[host] = Shell(
                host or "the server", home, env, self.folder / "runs" / (host or SERVER_DIR)
            )
        return self.shells[host]

    def run(self, step: Step) -> None:
        where = step.where(f"docs/{self.name}")
        shell = self.shell(step.host)
        if step.starts_worker:
            self.start_worker(step, shell, where)
            return
        code, printed = shell.run(step.command, COMMAND_TIMEOUT_S)
        assert code == 0, f"{where}\nexited {code}:\n{printed}\n{self.stack.all_logs()}"
        missing = missing_output(step.expected, printed)
        assert missing is None, f"{where}\ndid not print {missing!r}; it printed:\n{printed}"

    def start_worker(self, step: Step, shell: Shell, where: str) -> None:
        """Start a ``dramatiq`` line in the background; wait until the server counts each of its
        processes live on each of its queues, then look for its expected lines in its log."""
        queues = option(step, "--queues", "gpu,cpu").split(",")
        processes = int(option(step, "--processes", "1"))
        before = {queue: live(self.stack, queue) for queue in queues}
        log = shell.start(step.command)

        def joined() -> bool:
            return all(live(self.stack, queue) >= before[queue] + processes for queue in queues)

        wait_for(f"{where} to join", joined, 120, self.stack, 0.5)
        printed = log.read_text(errors="replace")
        missing = missing_output(step.expected, printed)
        assert missing is None, f"{where}\ndid not log {missing!r}; it logged:\n{printed}"

    def close(self) -> None:
        for shell in self.shells.values():
            shell.close()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", PAGES)
def test_every_command_of_the_page_runs_as_shown(
    name: str, docs_stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    found = steps((DOCS / name).read_text())
    assert found, f"docs/{name} has no console block"
    page = Page(name, docs_stack, tmp_path_factory.mktemp(name.removesuffix(".md")))
    try:
        for step in found:
            page.run(step)
    finally:
        page.close()


@pytest.mark.parametrize("name", PAGES)
def test_the_page_states_its_convention_and_why_a_block_is_not_run(name: str) -> None:
    text = (DOCS / name).read_text()
    head = "\n".join(text.splitlines()[:12])
    assert "tests/docs/test_doc_commands.py" in head, f"docs/{name} does not say at its top who runs it"
    unexplained = unexplained_blocks(text)
    assert not unexplained, (
        f"docs/{name}: shell blocks without 'Not run by the tests: why' at lines {unexplained}"
    )


def test_the_server_serves_the_exported_openapi_document(docs_stack: Stack) -> None:
    """user-guide.md: docs/openapi.json is what the server serves at /openapi.json."""
    served = docs_stack.get("/openapi.json", timeout=30).json()
    assert render(served) == (DOCS / "openapi.json").read_text()


PAGE = """# A page

```console
$ morag-pipeline submit \\
    samples/talk.mp4
talk.mp4: done
gpu-box-1$ MORAG_LOG_LEVEL=INFO dramatiq pipeline.actors.gpu --queues gpu
... is booting up.
```

Not run by the tests: it needs a GPU.

```shell
nvidia-smi
```

```shell
rm -rf /
```
"""


def test_the_runner_reads_commands_hosts_continuations_and_output() -> None:
    found = steps(PAGE)
    assert [(s.host, s.command, s.expected, s.line) for s in found] == [
        ("", "morag-pipeline submit \\\n    samples/talk.mp4", ["talk.mp4: done"], 4),
        (
            "gpu-box-1",
            "MORAG_LOG_LEVEL=INFO dramatiq pipeline.actors.gpu --queues gpu",
            ["... is booting up."],
            7,
        ),
    ]
    assert [s.starts_worker for s in found] == [False, True]
    assert unexplained_blocks(PAGE) == [18], "the shell block without its reason"
    with pytest.raises(ValueError, match="line 2: output before any command: 'talk.mp4: done'"):
        steps("```console\ntalk.mp4: done\n```\n")


def test_expected_output_is_matched_in_order_with_gaps_spacing_and_case() -> None:
    printed = "talk.mp4: task 5e68 -> queue gpu\ntalk.mp4:   DONE\nRemote workers turn your recordings\n"
    assert (
        missing_output(
            ["talk.mp4: task ... -> queue gpu", "talk.mp4: done", "remote ... recordings"], printed
        )
        is None
    )
    assert missing_output(["talk.mp4: done", "talk.mp4: task ..."], printed) == "talk.mp4: task ..."
    assert missing_output(["queue cpu"], printed) == "queue cpu"
