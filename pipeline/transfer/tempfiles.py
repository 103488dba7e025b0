"""Task folders left behind by worker processes that died.

A worker fetches each input into a private folder named ``morag-task-...`` in
the system's temporary directory and removes it when the task ends, however it
ends. A process killed mid-task (out of memory, SIGKILL) cannot; the next
worker start on that machine removes what it left (``remove_leftovers``).

A folder named ``morag-task-<pid>-...`` belongs to process ``<pid>``: it is
left alone while that process runs, and removed once it has gone (or when the
process now running under that id started after the folder was last changed,
so the id was reused). A folder without a process id in its name is removed
only once it is older than ``max_age_s``, longer than any task may run.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.jobs import TMP_PREFIX
from pipeline.logs import get_logger

logger = get_logger(__name__)

_OWNED = re.compile(re.escape(TMP_PREFIX) + r"(\d+)-")


def task_dir_prefix(pid: int | None = None) -> str:
    """The prefix of a task folder made by process ``pid`` (this one by default)."""
    return f"{TMP_PREFIX}{os.getpid() if pid is None else pid}-"


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), if the system says (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
    except (OSError, IndexError, StopIteration, ValueError):
        return None
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _abandoned(name: str, changed: float, now: float, max_age_s: float) -> bool:
    owner = _OWNED.match(name)
    if owner is None:
        return now - changed > max_age_s
    pid = int(owner.group(1))
    if pid == os.getpid():
        return False
    if not _alive(pid):
        return True
    started = _process_start(pid)
    return started is not None and started > changed + 1.0


def remove_leftovers(folder: Path | None = None, *, max_age_s: float = 24 * 3600.0) -> list[Path]:
    """Remove task folders of dead processes from ``folder`` (the system temp dir); returns them.

    Only folders this user owns are considered.
    """
    root = folder or Path(tempfile.gettempdir())
    now = time.time()
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(TMP_PREFIX):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not entry.is_dir(follow_symlinks=False) or info.st_uid != os.getuid():
            continue
        if _abandoned(entry.name, info.st_mtime, now, max_age_s):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    if removed:
        logger.info(
            "removed task folders left by dead workers",
            extra={"count": len(removed), "folders": [p.name for p in removed]},
        )
    return removed
