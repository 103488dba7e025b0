"""``morag-pipeline server``: the API, and the consumer of the ``control`` queue."""

from __future__ import annotations

import time
from collections.abc import Callable

import pika
import uvicorn
from dramatiq import Worker

from pipeline.api.app import create_app
from pipeline.api.auth import Authenticator
from pipeline.brokers import QUEUES, current_broker
from pipeline.brokers.limits import check_consumer_timeout
from pipeline.brokers.rabbitmq import connection_parameters
from pipeline.config import Settings, redact_url
from pipeline.errors import PipelineError
from pipeline.fleet.capacity import CapacityProbe
from pipeline.fleet.registry import get_registry
from pipeline.fleet.scheduler import Liveness, start_liveness
from pipeline.health import SWEEP_PART, Part, PartLog, report, sweep_allowance
from pipeline.logs import get_logger
from pipeline.security.audit import open_audit_log
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


def server_parts(
    settings: Settings, control: Worker, liveness: Liveness, files: FileServices, started: float
) -> dict[str, Callable[[], Part]]:
    """The checks of ``/healthz``: broker, control consumer, liveness scheduler (its last sweep), SFTP."""
    sweeps = PartLog(settings.db_path)
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
    services = get_services()
    broker = current_broker()
    import pipeline.actors.control  # noqa: F401
    import pipeline.actors.cpu  # noqa: F401  (registers every task actor, for publishing)
    import pipeline.actors.fleet  # noqa: F401

    for queue in QUEUES:
        broker.declare_queue(queue, ensure=True)
    check_consumer_timeout(settings)  # logs a warning when a queue would redeliver a task still running

    if settings.dev_mode:
        logger.warning("development mode: requests without an API key act as admin; never expose this")
    open_audit_log(settings.data_dir / "audit.log", settings.audit_max_bytes, settings.audit_backups)
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
