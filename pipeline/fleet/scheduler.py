"""The liveness process: exactly one periodiq scheduler, and the consumer that runs the sweep.

``morag-pipeline server`` starts it as a child process (``start_liveness``),
``python -m pipeline.fleet.scheduler``. Its main thread runs periodiq's scheduler,
which sends the sweep message to the ``liveness`` queue on the cron of
``MORAG_SWEEP_CRON`` (every minute by default, periodiq's finest grain); a
Dramatiq worker thread in the same process consumes that queue and sweeps.

Why a child process and not a thread of the server: periodiq's scheduler
sleeps with ``alarm()`` and wakes in a SIGALRM handler, and Python lets only
the main thread install signal handlers; the server's main thread belongs to
uvicorn. Running the sweep there too keeps a long sweep (thousands of
messages to move) off the server's ``control`` consumer, so task events and
heartbeats keep flowing while it runs; registry and task store are the
database both processes share.

The child is started and stopped with the server, and started again when it
dies: it dies with the server (``PR_SET_PDEATHSIG`` on Linux, and it checks
its parent every tick), stops cleanly on SIGTERM (a sweep under way finishes
first). One liveness process at a time leads (``take_lead``): a lock file in
the data directory keeps a second server on the same data from starting a
second scheduler (periodiq sends duplicate ticks if two run), and on
PostgreSQL an advisory lock lets exactly one replica of a group sweep while
the others stand by, each ready to take over within seconds of the leader's
end. A broker that is away at a tick costs that tick only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dramatiq import Worker

from pipeline.config import Settings
from pipeline.logs import get_logger

logger = get_logger("pipeline.fleet.scheduler")  # also when run as __main__

LOCK_NAME = "scheduler.lock"
#: The PostgreSQL advisory lock of the sweeps ("morag-sw" in ASCII): one replica sweeps at a time.
SWEEP_LOCK = 0x6D6F7261672D7377
#: Seconds between two tries of a standing-by replica to take the lead.
LEAD_RETRY_S = 2.0


#: Seconds a stopping liveness process gets to finish a sweep under way.
STOP_TIMEOUT_S = 30.0


#: Exit code of a liveness process that found the lock taken (another server sweeps).
STANDBY = 3
#: Seconds between two tries of a standby liveness process to take the lock.
STANDBY_RETRY_S = 30.0


class Liveness:
    """The liveness process, kept running: ``start`` starts it, ``stop`` ends it.

    A thread watches the child and starts it again when it dies, after a
    pause that doubles up to a minute; a child that found the scheduler lock
    taken (another server on the same data sweeps) is tried again every
    ``STANDBY_RETRY_S`` seconds, so it takes over when that server goes.

    Parameters:
      settings: the server's settings, passed on to the child.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self.standby = False
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None

    def start(self) -> Liveness:
        self._spawn()
        self._watcher = threading.Thread(target=self._watch, name="liveness-watch", daemon=True)
        self._watcher.start()
        return self

    @property
    def alive(self) -> bool:
        with self._lock:
            return self.process is not None and self.process.poll() is None

    def _spawn(self) -> None:
        env = {
            **os.environ,
            # The settings this server runs with, even where they did not come from the environment.
            "MORAG_BROKER_URL": self.settings.broker_url.get_secret_value(),
            "MORAG_DATA_DIR": str(self.settings.data_dir),
            "MORAG_FILES_DIR": str(self.settings.files_dir),
            "MORAG_SWEEP_CRON": self.settings.sweep_cron,
            "MORAG_LOG_LEVEL": self.settings.log_level,
            "MORAG_LOG_JSON": "true" if self.settings.log_json else "false",
        }
        if self.settings.secret_key is not None:
            env["MORAG_SECRET_KEY"] = self.settings.secret_key.get_secret_value()
        if self.settings.database_url is not None:
            env["MORAG_DATABASE_URL"] = self.settings.database_url.get_secret_value()
        child = subprocess.Popen(
            [sys.executable, "-m", "pipeline.fleet.scheduler", str(os.getpid())], env=env
        )
        with self._lock:
            self.process = child
        logger.info("liveness process started", extra={"pid": child.pid, "cron": self.settings.sweep_cron})

    def _watch(self) -> None:
        pause = 1.0
        while not self._stopping.wait(1.0):
            with self._lock:
                code = self.process.poll() if self.process is not None else None
            if code is None:
                continue
            self.standby = code == STANDBY
            if self.standby:
                wait = STANDBY_RETRY_S
            else:
                logger.error(
                    "liveness process died; starting it again", extra={"exit_code": code, "in_s": pause}
                )
                wait, pause = pause, min(pause * 2, 60.0)
            if self._stopping.wait(wait):
                return
            self.restarts += 0 if self.standby else 1
            self._spawn()

    def stop(self) -> None:
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        with self._lock:
            process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def start_liveness(settings: Settings) -> Liveness:
    """Start the liveness process (scheduler and sweep) as a child of this one, and keep it running."""
    return Liveness(settings).start()


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(0)


class Lead:
    """The right to schedule and run sweeps, held by one liveness process at a time.

    On SQLite (one server) it is a lock file in the data directory; on
    PostgreSQL (several replicas, on several machines) a session advisory
    lock, held on a connection of its own: PostgreSQL frees it when that
    connection ends, however the process died.

    Parameters:
      release: lets the lead go.
      check: raises when the lead was lost (the database connection ended).
    """

    def __init__(self, release: Callable[[], None], check: Callable[[], None] = lambda: None) -> None:
        self.release = release
        self.check = check


def take_lead(settings: Settings, wait: Callable[[float], bool]) -> Lead | None:
    """The lead of this server's liveness processes, or None when another process holds it.

    On PostgreSQL a replica waits for the lead (``wait(seconds)`` returning
    true gives up, returning None) and takes it within ``LEAD_RETRY_S`` of its
    holder's end; on SQLite it does not wait.
    """
    from pipeline.replicas import is_replicated

    if is_replicated(settings):
        return _advisory_lead(settings, wait)
    return _file_lead(settings.data_dir)


def _advisory_lead(settings: Settings, wait: Callable[[float], bool]) -> Lead | None:
    from sqlalchemy import text

    from pipeline.db import engine_for

    connection = engine_for(settings).connect().execution_options(isolation_level="AUTOCOMMIT")
    told = False
    while not connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": SWEEP_LOCK}).scalar():
        if not told:
            logger.info("another replica sweeps; this one stands by to take over")
            told = True
        if wait(LEAD_RETRY_S):
            connection.close()
            return None

    def check() -> None:
        connection.execute(text("SELECT 1"))

    return Lead(connection.close, check)


def _file_lead(data_dir: Path) -> Lead | None:
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = (data_dir / LOCK_NAME).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return Lead(handle.close)


def main(argv: list[str]) -> int:
    """Sweep on periodiq's ticks until the parent server goes or SIGTERM comes."""
    parent = int(argv[0]) if argv else os.getppid()
    _die_with_parent(parent)
    from pipeline.config import get_settings
    from pipeline.logs import setup_logging

    settings = get_settings()
    setup_logging(settings.log_level, settings.log_json)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    lead = take_lead(settings, lambda seconds: stopping.wait(seconds) or os.getppid() != parent)
    if lead is None:
        if stopping.is_set() or os.getppid() != parent:
            return 0
        logger.warning(
            "another liveness scheduler holds the lock; this server stands by and sends no sweeps",
            extra={"lock": str(settings.data_dir / LOCK_NAME)},
        )
        return STANDBY
    from periodiq import Scheduler

    import pipeline.actors.cpu  # noqa: F401  (every task actor: the reconciler publishes tasks)
    from pipeline.actors.fleet import SWEEP_QUEUE, liveness_sweep
    from pipeline.security.audit import open_audit_log

    open_audit_log(settings.data_dir / "audit.log", settings.audit_max_bytes, settings.audit_backups)
    from pipeline.brokers import current_broker

    broker = current_broker()
    broker.declare_queue(SWEEP_QUEUE, ensure=True)
    worker = Worker(broker, queues={SWEEP_QUEUE}, worker_threads=1)
    worker.start()

    class _Scheduler(Scheduler):
        def schedule(self) -> None:
            if os.getppid() != parent:
                raise SystemExit(0)
            try:
                lead.check()
            except Exception as exc:  # its holder cannot know that no other process sweeps now
                logger.error("lead of the sweeps lost; stopping", extra={"error": str(exc)})
                raise SystemExit(1) from None
            super().schedule()

        def send_actors(self, actors: list, now: object) -> None:
            # A broker away at a tick loses that tick, not the scheduler: the next one comes.
            try:
                super().send_actors(actors, now)
            except Exception as exc:
                logger.warning("sweep not scheduled: broker unreachable", extra={"error": str(exc)})
                return
            for actor in actors:
                logger.info("sweep scheduled", extra={"actor": actor.actor_name, "at": str(now)})

    scheduler = _Scheduler(actors=[liveness_sweep])
    # SIGTERM ends periodiq's loop (it stops on a false item); the worker then stops cleanly.
    signal.signal(signal.SIGTERM, lambda *_: scheduler.alarm_q.put_nowait(False))
    if stopping.is_set():  # a SIGTERM came while the lead was being taken
        scheduler.alarm_q.put_nowait(False)
    logger.info(
        "liveness scheduler running",
        extra={"cron": str(liveness_sweep.options["periodic"]), "pid": os.getpid()},
    )
    # Like periodiq's own CLI: a start late in a minute waits for the next one.
    second = time.localtime().tm_sec
    if second > 55:
        time.sleep(60 - second)
    try:
        scheduler.schedule()
        scheduler.loop()
    finally:
        signal.alarm(0)
        worker.stop(timeout=int(STOP_TIMEOUT_S * 1000))
        broker.close()
        lead.release()
        logger.info("liveness process stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
