"""Run a function in a long-lived child process, under a memory cap and a time cap.

A ``CappedChild`` owns one child process, started on first use with the
"spawn" method (a worker process runs threads, and forking a threaded process
can copy a lock another thread held). The child stays up between calls, so
what it loaded once (docling and its models) serves every later call. Calls
run one at a time; callers from several threads wait their turn.

While a call runs, the parent reads the child's resident memory (VmRSS plus
VmSwap from ``/proc/<pid>/status``, so Linux only) every ``POLL_S`` seconds and
kills the child past the memory cap. An address-space limit (RLIMIT_AS) is no
use here: torch maps gigabytes of address space it never touches, several
times the memory it uses. A child allocating faster than the poll can outrun
the cap by what it allocates in one interval before it is killed.

The function may call ``started()`` once its preparation is done (imports,
models loaded): the time cap counts from there, and a cap passed before it is
reported as ``during_start``, the environment's doing rather than the
input's. Preparation itself may take up to ``START_TIMEOUT_S``.

A killed or crashed child is replaced by a fresh one on the next call.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from pipeline.logs import get_logger

logger = get_logger(__name__)

#: Seconds between two readings of the child's memory while a call runs.
POLL_S = 0.05
#: Seconds a call's preparation (before ``started()``) may take: loading docling takes seconds.
START_TIMEOUT_S = 300.0
#: Seconds between two tries for the turn, so a time limit or a shutdown reaches a waiting thread.
WAIT_S = 1.0

_MB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """The caps of one call: ``max_memory_mb`` of resident memory for the child as a whole, and
    ``time_limit_s`` seconds from ``started()``. A result larger than the memory cap is refused."""

    max_memory_mb: int
    time_limit_s: float


class CapExceeded(Exception):
    """The child passed a cap and was killed.

    ``cap`` is "memory" or "time"; ``during_start`` is true when it happened
    before the function called ``started()``.
    """

    def __init__(self, cap: str, limits: Limits, during_start: bool, detail: str) -> None:
        super().__init__(detail)
        self.cap = cap
        self.limits = limits
        self.during_start = during_start


class ChildDied(Exception):
    """The child ended in the middle of a call, not killed by us (a crash, the kernel's OOM killer).

    ``during_start`` is true when it ended before the function called ``started()``.
    """

    def __init__(self, exitcode: int | None, during_start: bool) -> None:
        self.exitcode = exitcode
        self.during_start = during_start
        super().__init__(f"the child process ended unexpectedly ({describe_exit(exitcode)})")


class ResultTooLarge(Exception):
    """The call's result is larger than the memory cap; the child was killed before it was read."""


def describe_exit(exitcode: int | None) -> str:
    """``killed by SIGSEGV``, ``exit status 1``, or ``no exit status``."""
    if exitcode is None:
        return "no exit status"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"


def resident_mb(pid: int) -> float | None:
    """Resident plus swapped-out memory of process ``pid`` in MB; None when it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            lines = status.read().splitlines()
    except OSError:
        return None
    kb = 0
    for line in lines:
        if line.startswith(("VmRSS:", "VmSwap:")):
            kb += int(line.split()[1])
    return kb / 1024


class CappedChild:
    """One long-lived child process that runs calls one at a time under ``Limits``.

    Parameters:
      name: what the child is called in logs ("document converter").

    ``call(fn, args, limits)`` runs ``fn(*args)`` in the child (``fn`` must be a
    module-level function, its arguments and result picklable) and returns its
    result or raises what it raised. Past a cap it raises ``CapExceeded``; a
    child that ends mid-call raises ``ChildDied``. Both leave no child behind:
    the next call starts a fresh one. Safe to use from several threads.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._starts = 0
        self._ended = ""  # why the last child is gone, for the restart's log line

    @property
    def pid(self) -> int | None:
        """The running child's process id, or None."""
        process = self._process
        return process.pid if process is not None and process.is_alive() else None

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...], limits: Limits) -> Any:
        """``fn(*args)`` run in the child under ``limits``, after the calls before it.

        The turn is awaited, and the child watched, in steps of at most a
        second, so an exception raised in the waiting thread (Dramatiq's time
        limit, a shutdown) gets through; it kills a child that was running the call.
        """
        while not self._lock.acquire(timeout=WAIT_S):
            pass
        try:
            process, conn = self._ready(limits)
            try:
                conn.send((fn, args))
            except OSError:
                self._kill("it ended before the call reached it")
                raise ChildDied(process.exitcode, during_start=True) from None
            kind, value = self._wait(process, conn, limits)
        finally:
            self._lock.release()
        if kind == "error":
            raise value
        return value

    def close(self) -> None:
        """Stop the child, if any (the next call starts another)."""
        with self._lock:
            self._stop()

    def _ready(self, limits: Limits) -> tuple[BaseProcess, Connection]:
        process = self._process
        if process is not None and not process.is_alive():
            self._ended = f"it ended ({describe_exit(process.exitcode)})"
            self._stop()
        elif process is not None:
            idle = resident_mb(process.pid) or 0.0
            if idle >= limits.max_memory_mb:
                self._kill(f"idle at {idle:.0f} MB, at or over the cap of {limits.max_memory_mb} MB")
        if self._process is None:
            self._start()
        assert self._process is not None and self._conn is not None
        return self._process, self._conn

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe(duplex=True)
        process = context.Process(target=_serve, args=(child,), name=self.name, daemon=True)
        process.start()
        child.close()
        self._process, self._conn = process, parent
        self._starts += 1
        if self._starts == 1:
            logger.info(f"{self.name} started", extra={"pid": process.pid})
        else:
            logger.info(f"{self.name} restarted", extra={"pid": process.pid, "reason": self._ended})

    def _wait(self, process: BaseProcess, conn: Connection, limits: Limits) -> tuple[str, Any]:
        """The child's reply: ("result", value) or ("error", exception)."""
        sent = time.monotonic()
        started: float | None = None
        try:
            while True:
                if conn.poll(POLL_S):
                    try:
                        kind, value = pickle.loads(conn.recv_bytes(maxlength=limits.max_memory_mb * _MB))
                    except (EOFError, ConnectionError):
                        process.join(timeout=5)
                        how = describe_exit(process.exitcode)
                        log = {"pid": process.pid, "reason": how}
                        logger.warning(f"{self.name} ended mid-call", extra=log)
                        self._ended = f"it ended mid-call ({how})"
                        self._stop()
                        raise ChildDied(process.exitcode, started is None) from None
                    except OSError:  # its length is over maxlength: the result was never read
                        self._kill(f"its result is larger than the cap of {limits.max_memory_mb} MB")
                        raise ResultTooLarge(
                            f"the result is larger than the memory cap of {limits.max_memory_mb} MB"
                        ) from None
                    if kind == "started":
                        started = time.monotonic()
                        continue
                    return kind, value
                now = time.monotonic()
                used = resident_mb(process.pid)
                if used is not None and used > limits.max_memory_mb:
                    detail = f"{used:.0f} MB resident, over the cap of {limits.max_memory_mb} MB"
                    self._kill(detail)
                    raise CapExceeded("memory", limits, started is None, detail)
                if started is None and now - sent > START_TIMEOUT_S:
                    detail = f"still preparing after {START_TIMEOUT_S:.0f} s"
                    self._kill(detail)
                    raise CapExceeded("time", limits, True, detail)
                if started is not None and now - started > limits.time_limit_s:
                    detail = f"still running after {limits.time_limit_s:g} s, the time cap"
                    self._kill(detail)
                    raise CapExceeded("time", limits, False, detail)
        except (CapExceeded, ChildDied, ResultTooLarge):
            raise
        except BaseException as exc:  # a time limit or shutdown reaching the waiting thread
            self._kill(f"the caller stopped waiting ({type(exc).__name__})")
            raise

    def _kill(self, reason: str) -> None:
        process = self._process
        if process is not None:
            logger.warning(f"{self.name} killed", extra={"pid": process.pid, "reason": reason})
            process.kill()
            process.join(timeout=10)
        self._ended = f"killed: {reason}"
        self._stop()

    def _stop(self) -> None:
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if conn is not None:
            conn.close()  # the child reads end-of-file and exits
        if process is not None:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)


# The child's side.

_conn: Connection | None = None


def started() -> None:
    """Tell the parent that preparation is over: the time cap counts from now.

    Does nothing outside a capped child.
    """
    if _conn is not None:
        _conn.send_bytes(pickle.dumps(("started", None)))


def _serve(conn: Connection) -> None:
    """The child's loop: run each call it receives, send back its result or exception."""
    global _conn
    _conn = conn
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when the child ends
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply = pickle.dumps(("result", fn(*args)))
        except Exception as exc:
            reply = _pickled_error(exc)
        try:
            conn.send_bytes(reply)
        except OSError:
            return


def _pickled_error(exc: Exception) -> bytes:
    """The exception, pickled; a plain RuntimeError with its text when it cannot cross."""
    try:
        data = pickle.dumps(("error", exc))
        pickle.loads(data)
        return data
    except Exception:
        return pickle.dumps(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))


def _exit_with_parent(parent: int) -> None:
    """End the child when its parent is gone, even in the middle of a call (no one watches its caps)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)
