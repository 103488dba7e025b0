"""The commands of a doc page, read from its fenced blocks, and the shells that run them.

The convention every page under docs/ that uses it states at its top:

- A ```` ```console ```` block is run by the tests. Each line that starts with
  ``$ `` is a command typed on the server's host; ``NAME$ `` (``gpu-box-1$ ``)
  a command typed on the machine NAME. A command ending in ``\\`` goes on to
  the next line. The lines under a command, up to the next one, are output
  the command must print, in that order, among what else it prints; ``...``
  in such a line stands for any text, and spacing and case may differ.
  The command must exit 0 (a page shows a failing command as
  ``cmd; echo "exit code $?"``, and its output then holds that line).
- A command whose first word (after any ``NAME=value``) is ``dramatiq``
  starts a worker and does not return: it is started in the background, the
  runner waits until the server counts its processes live, its output lines
  are looked for in what it logged, and it runs until the page ends.
- A ```` ```shell ```` block holds commands the tests do not run; the
  paragraph right before it starts with ``Not run by the tests:`` and says why.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

RUN = "console"
NOT_RUN = "shell"
NOT_RUN_REASON = "Not run by the tests:"
#: ``$ cmd`` (the server's host) or ``NAME$ cmd`` (the machine NAME).
PROMPT = re.compile(r"^(?P<host>[A-Za-z0-9][A-Za-z0-9_.-]*)?\$ (?P<command>.*)$")
SERVER = ""  # the host of a plain ``$`` prompt
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass
class Step:
    """One command of a page and the output it must print.

    Parameters:
      host: the machine it is typed on (``""``: the server's host).
      command: the command, continuation lines joined with newlines.
      expected: the output lines it must print, in order (``...`` is any text).
      line: where the command starts in the page (1-based).
    """

    host: str
    command: str
    expected: list[str] = field(default_factory=list)
    line: int = 0

    @property
    def starts_worker(self) -> bool:
        """Whether the command is ``dramatiq ...`` (after any ``NAME=value`` settings)."""
        words = [w for w in shlex.split(self.command, comments=True) if not ASSIGNMENT.match(w)]
        return bool(words) and words[0] == "dramatiq"

    def where(self, page: str) -> str:
        prompt = f"{self.host}$" if self.host else "$"
        return f"{page}:{self.line}: {prompt} {self.command}"


@dataclass
class Block:
    """A fenced block: its language, its lines, the line it starts on, and the paragraph before it."""

    language: str
    lines: list[str]
    line: int
    before: str


def blocks(text: str) -> list[Block]:
    """Every fenced block of a Markdown page, in order."""
    found: list[Block] = []
    lines = text.splitlines()
    paragraph: list[str] = []  # the last paragraph of text seen
    blank = True
    number = 0
    while number < len(lines):
        line = lines[number]
        fence = re.match(r"^(`{3,}|~{3,})\s*([\w+-]*)", line)
        if not fence:
            if line.strip():
                paragraph = [*([] if blank else paragraph), line.strip()]
            blank = not line.strip()
            number += 1
            continue
        marker, language = fence.group(1), fence.group(2)
        body: list[str] = []
        start = number + 1
        number += 1
        while number < len(lines) and not lines[number].startswith(marker):
            body.append(lines[number])
            number += 1
        found.append(Block(language, body, start + 1, " ".join(paragraph)))
        paragraph, blank = [], True
        number += 1
    return found


def steps(text: str) -> list[Step]:
    """The commands of a page's ``console`` blocks, with the output each must print."""
    found: list[Step] = []
    for block in blocks(text):
        if block.language != RUN:
            continue
        current: Step | None = None
        continued = False
        for offset, line in enumerate(block.lines):
            if continued and current is not None:
                current.command += "\n" + line
                continued = line.endswith("\\")
                continue
            prompt = PROMPT.match(line)
            if prompt:
                current = Step(
                    prompt.group("host") or SERVER, prompt.group("command"), line=block.line + offset
                )
                found.append(current)
                continued = current.command.endswith("\\")
            elif current is None:
                if line.strip():
                    raise ValueError(f"line {block.line + offset}: output before any command: {line!r}")
            elif line.strip():
                current.expected.append(line)
    return found


def unexplained_blocks(text: str) -> list[int]:
    """The lines of ``shell`` blocks with no ``Not run by the tests:`` paragraph right before them."""
    return [b.line for b in blocks(text) if b.language == NOT_RUN and not b.before.startswith(NOT_RUN_REASON)]


def _pattern(expected: str) -> re.Pattern[str]:
    """An expected line as a pattern: ``...`` is any text, a run of spaces any spacing, any case."""
    parts = [r"\s+".join(map(re.escape, part.split())) for part in expected.split("...")]
    return re.compile(".*".join(parts), re.IGNORECASE)


def missing_output(expected: list[str], printed: str) -> str | None:
    """The first expected line not printed (in order), or None when every one was."""
    lines = printed.splitlines()
    at = 0
    for wanted in expected:
        pattern = _pattern(wanted)
        for index in range(at, len(lines)):
            if pattern.search(lines[index].strip()):
                at = index + 1
                break
        else:
            return wanted
    return None


class Shell:
    """A bash on one machine of a page, kept for the whole page so that variables and ``cd`` hold.

    Parameters:
      name: the machine's name (for messages).
      cwd: the folder it starts in.
      env: its environment.
      folder: where its commands' output and exit codes are written.
    """

    def __init__(self, name: str, cwd: Path, env: dict[str, str], folder: Path) -> None:
        self.name = name
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            stdin=subprocess.PIPE,
            stdout=(folder / "shell.log").open("ab"),
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            text=True,
            start_new_session=True,
        )

    def _send(self, script: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(script)
        self.proc.stdin.flush()

    def run(self, command: str, timeout: float) -> tuple[int, str]:
        """Run ``command`` in this shell; its exit code and what it printed (stdout and stderr)."""
        self.count += 1
        out, code = self.folder / f"{self.count}.out", self.folder / f"{self.count}.rc"
        self._send(f"{{ {command}\n}} >{shlex.quote(str(out))} 2>&1 </dev/null\n"
                   f"echo $? >{shlex.quote(str(code))}.part && mv {shlex.quote(str(code))}.part "
                   f"{shlex.quote(str(code))}\n")  # fmt: skip
        deadline = time.monotonic() + timeout
        while not code.exists():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the shell of {self.name} exited ({self.proc.returncode}):\n{self.log()}"
                )
            if time.monotonic() > deadline:
                printed = out.read_text(errors="replace") if out.exists() else ""
                raise AssertionError(f"did not return within {timeout:g}s; printed so far:\n{printed}")
            time.sleep(0.1)
        return int(code.read_text()), out.read_text(errors="replace")

    def start(self, command: str) -> Path:
        """Start ``command`` in the background in this shell (a worker); returns its log."""
        self.count += 1
        log = self.folder / f"{self.count}.log"
        self._send(f"{{ {command}\n}} >{shlex.quote(str(log))} 2>&1 </dev/null &\n")
        return log

    def log(self) -> str:
        return (self.folder / "shell.log").read_text(errors="replace")

    def close(self, grace: float = 30) -> None:
        """Stop the shell and everything it started, as systemd stops a unit: SIGTERM to every
        process (a worker says goodbye and hands back its message), SIGKILL to those left after
        ``grace`` seconds."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait()
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        deadline = time.monotonic() + grace
        while group_members(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def group_members(group: int) -> list[int]:
    """The processes of a process group that still run (zombies, which only wait to be reaped,
    are left out)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) == group:
                found.append(int(stat.parent.name))
    return found
