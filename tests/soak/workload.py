"""The soak's workload: a steady flow of small tasks, every submission tracked by its file name.

Each submission sends a file with a name of its own (``soak-0007-notes.md``), so a task the
server recorded while its answer was lost (the server killed mid-request) is still found,
by name, when the tasks are counted.
"""

from __future__ import annotations

import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.conftest import SAMPLES, Stack

#: What the soak submits, and how often: cheap documents mostly, a few transcriptions
#: (expensive on a CPU), and now and then a recording whose media data is cut short.
KINDS: dict[str, float] = {"md": 6, "html": 3, "docx": 2, "speech": 2, "corrupt": 0.5}


@dataclass
class Submission:
    """One file sent to the server and what came of it.

    Parameters:
      number: its place in the flow.
      kind: one of ``KINDS``.
      name: the file's name, unique in the run.
      task_id: the id the server answered with; None when it refused the file or never answered.
      attempts: POSTs made; every one but an answered one was cut or refused by a server away.
      unanswered: attempts that got no answer (connection refused or cut, a timeout, a 5xx).
      refused: the reason of a 4xx answer (a file the server will not take).
      at: when it was first sent.
    """

    number: int
    kind: str
    name: str
    task_id: str | None = None
    attempts: int = 0
    unanswered: int = 0
    refused: str | None = None
    at: float = 0.0
    errors: list[str] = field(default_factory=list)


class Inputs:
    """Makes the soak's input files, each under a unique name, in ``folder``.

    Parameters:
      folder: where the files are written.
      docx: a small DOCX to copy (the suite's ``docx_file``).
      corrupt: an MP4 whose media data is cut short (the suite's ``corrupt_mp4``).
    """

    def __init__(self, folder: Path, docx: Path, corrupt: Path) -> None:
        self.folder = folder
        self.sources = {"html": SAMPLES / "report.html", "docx": docx, "speech": SAMPLES / "speech.mp3",
                        "corrupt": corrupt}  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)

    def make(self, number: int, kind: str) -> Path:
        if kind == "md":
            path = self.folder / f"soak-{number:05}-notes.md"
            body = "".join(f"- item {i} of note {number}\n" for i in range(20))
            path.write_text(f"# Soak note {number}\n\n{body}")
            return path
        source = self.sources[kind]
        path = self.folder / f"soak-{number:05}-{kind}{source.suffix}"
        shutil.copy(source, path)
        return path


class Submitter(threading.Thread):
    """Sends ``total`` files, one every ``interval`` seconds, to ``POST /api/v1/tasks``.

    A submit that gets no answer (the server is down or restarting, the answer was cut) is sent
    again, with a pause, until ``give_up_s`` has passed; every attempt is counted. A 4xx answer
    is recorded as refused, with its reason, and not sent again.

    Parameters:
      stack: the server to submit to, as its admin.
      inputs: makes the files.
      rng: the run's seeded random numbers (which kind comes next).
      total: how many files to send.
      interval: seconds between the starts of two submissions.
      give_up_s: how long one file is tried before it is recorded as never answered.
    """

    def __init__(
        self, stack: Stack, inputs: Inputs, rng: random.Random, total: int, interval: float,
        give_up_s: float = 300,
    ) -> None:  # fmt: skip
        super().__init__(name="soak-submitter", daemon=True)
        self.stack, self.inputs, self.total, self.interval = stack, inputs, total, interval
        self.give_up_s = give_up_s
        kinds, weights = zip(*KINDS.items(), strict=True)
        self.plan = rng.choices(kinds, weights, k=total)
        self.submissions: list[Submission] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            start = time.monotonic()
            for number, kind in enumerate(self.plan):
                if self.stop.wait(max(0.0, start + number * self.interval - time.monotonic())):
                    return
                path = self.inputs.make(number, kind)
                sub = Submission(number, kind, path.name, at=time.time())
                self.submissions.append(sub)
                self._send(sub, path)
        except BaseException as exc:  # shown by the test, not lost in a thread
            self.error = exc

    def _send(self, sub: Submission, path: Path) -> None:
        deadline = time.monotonic() + self.give_up_s
        while time.monotonic() < deadline and not self.stop.is_set():
            sub.attempts += 1
            try:
                with path.open("rb") as f:
                    response = self.stack.post("/api/v1/tasks", files={"file": (path.name, f)}, timeout=60)
            except httpx.HTTPError as exc:
                sub.unanswered += 1
                sub.errors.append(f"{type(exc).__name__}: {exc}")
            else:
                if response.status_code == 201:
                    sub.task_id = response.json()["id"]
                    return
                if response.status_code < 500 and response.status_code != 429:
                    sub.refused = f"{response.status_code}: {response.text[:300]}"
                    return
                sub.unanswered += 1
                sub.errors.append(f"{response.status_code}: {response.text[:300]}")
            time.sleep(1.0)
