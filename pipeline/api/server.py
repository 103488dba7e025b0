"""``morag-pipeline server``: the API, and the consumer of the ``control`` queue."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

import pika
import uvicorn
from dramatiq import Worker

from pipeline import migrations
from pipeline.api.app import create_app
from pipeline.api.auth import Authenticator
from pipeline.brokers import QUEUES, current_broker
from pipeline.brokers.limits import check_consumer_timeout
from pipeline.brokers.rabbitmq import connection_parameters, log_queue_type
from pipeline.config import Settings, redact_url
from pipeline.db import engine_for
from pipeline.errors import PipelineError
from pipeline.fleet.capacity import CapacityProbe
from pipeline.fleet.registry import get_registry
from pipeline.fleet.scheduler import Liveness, start_liveness
from pipeline.health import SWEEP_PART, Part, PartLog, report, sweep_allowance
from pipeline.logs import get_logger
from pipeline.security.audit import open_audit_log
from pipeline.security.keys import write_secret_check
from pipeline.security.ratelimit import FailureLimiter
from pipeline.services import get_services
from pipeline.transfer.serving import FileServices, start_file_services

logger = get_logger(__name__)


class BrokerUnreachable(PipelineError):
    """RabbitMQ did not answer."""


def check_broker(settings: Settings) -> None:
    try:
        pika.BlockingConnection(connection_parameters(settings)).close()
    except Exception as exc:
        url = redact_url(settings.broker_url.get_secret_value())
        reason = str(exc) or type(exc).__name__
        fix = ""
        if "CERTIFICATE_VERIFY_FAILED" in reason:
            fix = "; set MORAG_BROKER_CA_FILE to the CA that signed RabbitMQ's certificate"
        elif "ACCESS_REFUSED" in reason or "authentication" in reason.lower():
            fix = "; check the user and password in MORAG_BROKER_URL"
        raise BrokerUnreachable(f"cannot reach RabbitMQ at {url}: {reason}{fix}") from None


class AnotherServer(PipelineError):
    """A server already consumes ``control`` on this vhost."""


class ServerLock:
    """One server per vhost: an exclusive queue, ``morag.server``, held by this server.

    RabbitMQ lets only the connection that declared an exclusive queue use it,
    and deletes it when that connection closes, so a second server's declare
    is refused (RESOURCE_LOCKED) while the first lives, and succeeds once it
    died, however it died. The queue is on a connection of its own, kept open
    (and its heartbeats answered) by a thread; should RabbitMQ drop it, the
    thread takes the queue again. Two servers would each consume ``control``
    into their own database: workers would flap between them and completions
    would be lost.

    Parameters:
      settings: how to reach RabbitMQ.
    """

    QUEUE = "morag.server"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._connection: pika.BlockingConnection | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Takes the lock, or raises AnotherServer with the reason and the fix."""
        self._connection = self._take()
        self._thread = threading.Thread(target=self._hold, name="morag-server-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _take(self) -> pika.BlockingConnection:
        params = connection_parameters(self.settings)
        name = f"morag-pipeline server on {socket.gethostname()} (pid {os.getpid()})"
        params.client_properties = {"connection_name": name}
        connection = pika.BlockingConnection(params)
        try:
            connection.channel().queue_declare(self.QUEUE, exclusive=True, auto_delete=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            connection.close()
            if exc.reply_code != 405:  # RESOURCE_LOCKED
                raise
            url = redact_url(self.settings.broker_url.get_secret_value())
            raise AnotherServer(
                f"another morag-pipeline server consumes this vhost ({url}: it holds the queue"
                f" {self.QUEUE}); run one server per vhost, or give each its own MORAG_BROKER_URL vhost"
            ) from None
        return connection

    def _hold(self) -> None:
        while not self._stop.is_set():
            try:
                if self._connection is None or not self._connection.is_open:
                    self._connection = self._take()
                    logger.warning("server lock taken again after RabbitMQ dropped it")
                self._connection.process_data_events(time_limit=1)
            except Exception as exc:
                logger.error("server lock lost; taking it again", extra={"error": str(exc)})
                self._connection = None
                self._stop.wait(5)
        if self._connection is not None and self._connection.is_open:
            self._connection.close()


def server_parts(
    settings: Settings, control: Worker, liveness: Liveness, files: FileServices, started: float
) -> dict[str, Callable[[], Part]]:
    """The checks of ``/healthz``: broker, control consumer, liveness scheduler (its last sweep), SFTP."""
    sweeps = PartLog(settings)
    allowance = sweep_allowance(settings.sweep_cron)

    def broker() -> Part:
        check_broker(settings)
        return Part(True, {})

    def control_consumer() -> Part:
        threads = [*control.consumers.values(), *control.workers]
        return Part(bool(threads) and all(t.is_alive() for t in threads), {"threads": len(threads)})

    def scheduler() -> Part:
        last = sweeps.last(SWEEP_PART)
        at = last[0] if last else None
        detail = {
            "process": liveness.alive,
            "standby": liveness.standby,
            "restarts": liveness.restarts,
            "last_sweep": at,
            "last_sweep_age_s": round(time.time() - at, 1) if at else None,
        }
        recent = (at or started) > time.time() - allowance
        return Part((liveness.alive or liveness.standby) and (recent or liveness.standby), detail)

    def sftp() -> Part:
        if files.sftp is None:
            return Part(True, {"embedded": False})
        return Part(files.sftp.serving, {"port": files.sftp.port, "connections": files.sftp.connections})

    return {"broker": broker, "control": control_consumer, "scheduler": scheduler, "sftp": sftp}


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    check_broker(settings)
    lock = ServerLock(settings)
    lock.acquire()  # before anything consumes: a second server on this vhost refuses to start
    services = get_services()  # refuses a weak secret before anything else is opened
    database = engine_for(settings)  # its schema brought to the newest revision (``upgrade head``)
    logger.info(
        "task store ready",
        extra={"database": database.dialect.name, "revision": migrations.current(database)},
    )
    broker = current_broker()
    import pipeline.actors.control  # noqa: F401
    import pipeline.actors.cpu  # noqa: F401  (registers every task actor, for publishing)
    import pipeline.actors.fleet  # noqa: F401

    for queue in QUEUES:
        broker.declare_queue(queue, ensure=True)
    check_consumer_timeout(settings)  # logs a warning when a queue would redeliver a task still running
    log_queue_type(settings)  # the queue type on this broker and what it costs (priorities)

    if settings.dev_mode:
        logger.warning("development mode: requests without an API key act as admin; never expose this")
    open_audit_log(settings.data_dir / "audit.log", settings.audit_max_bytes, settings.audit_backups)
    write_secret_check(settings)  # a worker sharing the data directory checks its secret against it
    limiter = FailureLimiter(settings.auth_max_failures, settings.auth_failure_window_s)
    auth = Authenticator(services.apikeys, services.tokens, limiter, dev_mode=settings.dev_mode)
    # SFTP server (its host key fingerprint is logged) and store retention.
    files = start_file_services(settings, services.store, services.files, services.tokens)
    # One thread keeps task events in the order workers sent them.
    control = Worker(broker, queues={"control"}, worker_threads=1)
    control.start()
    # The one periodiq scheduler and the sweep, in a child process kept running.
    liveness = start_liveness(settings)
    parts = server_parts(settings, control, liveness, files, started=time.time())
    capacity = CapacityProbe(settings, get_registry(settings))
    app = create_app(services, broker, capacity, auth, health=lambda: report(parts))
    host, port = host or settings.api_host, port or settings.api_port
    tls = {}
    if settings.tls_cert_file and settings.tls_key_file:
        tls = {"ssl_certfile": str(settings.tls_cert_file), "ssl_keyfile": str(settings.tls_key_file)}
    scheme = "https" if tls else "http"
    logger.info(
        "server starting", extra={"url": f"{scheme}://{host}:{port}", "data_dir": str(settings.data_dir)}
    )
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", **tls)
    finally:
        files.stop()
        liveness.stop()
        control.stop()
        broker.close()
        lock.release()
