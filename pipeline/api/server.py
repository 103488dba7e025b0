"""``morag-pipeline server``: the API, and the consumer of the ``control`` queue."""

from __future__ import annotations

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
from pipeline.brokers.topology import check_topology
from pipeline.config import Settings, redact_url
from pipeline.db import engine_for
from pipeline.errors import PipelineError
from pipeline.fleet.capacity import CapacityProbe
from pipeline.fleet.registry import WorkerState, get_registry
from pipeline.fleet.scheduler import Liveness, start_liveness
from pipeline.health import SWEEP_PART, Part, PartLog, report, sweep_allowance
from pipeline.logs import get_logger
from pipeline.replicas import ServerPlace
from pipeline.security.audit import open_audit_log
from pipeline.security.keys import write_secret_check
from pipeline.security.ratelimit import FailureLimiter
from pipeline.services import get_services
from pipeline.transfer.serving import FileServices, start_file_services
from pipeline.transfer.sftp_server import host_key_path, load_host_key
from pipeline.webhooks.courier import Courier

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


def sftp_fingerprint(settings: Settings) -> str | None:
    """The host key fingerprint the embedded SFTP server will serve (None: it is not run)."""
    return load_host_key(host_key_path(settings)).fingerprint if settings.sftp_embedded else None


def server_parts(
    settings: Settings,
    control: Worker,
    liveness: Liveness,
    files: FileServices,
    started: float,
    place: ServerPlace,
    courier: Courier,
) -> dict[str, Callable[[], Part]]:
    """The checks of ``/healthz``: broker, control consumer, liveness scheduler (its last sweep), SFTP,
    the replicas of this server's group, the GPU workers that cannot run CUDA, and the webhook sender."""
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
            "last_sweep_by": last[1].get("by") if last else None,
            "last_sweep_age_s": round(time.time() - at, 1) if at else None,
        }
        recent = (at or started) > time.time() - allowance
        return Part((liveness.alive or liveness.standby) and (recent or liveness.standby), detail)

    def sftp() -> Part:
        if files.sftp is None:
            return Part(True, {"embedded": False})
        return Part(files.sftp.serving, {"port": files.sftp.port, "connections": files.sftp.connections})

    def replicas() -> Part:
        return Part(True, {"replicated": place.replicated, "running": place.replicas()})

    registry = get_registry(settings)

    def gpu_workers() -> Part:
        """Live workers whose GPU cannot run CUDA: their tasks go to CPU (the server stays ok)."""
        unusable = []
        for record in registry.list(time.time()):
            cuda = record.hardware.get("cuda") or {}
            if record.state is WorkerState.alive and cuda.get("wanted") and not cuda.get("usable"):
                unusable.append({"worker": record.id, "problems": cuda.get("problems") or []})
        return Part(True, {"cuda_unusable": unusable})

    def webhooks() -> Part:
        return Part(courier.alive, courier.deliveries.counts())

    return {
        "broker": broker,
        "control": control_consumer,
        "scheduler": scheduler,
        "sftp": sftp,
        "replicas": replicas,
        "gpu_workers": gpu_workers,
        "webhooks": webhooks,
    }


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    check_broker(settings)
    services = get_services()  # refuses a weak secret before anything else is opened
    # Before anything consumes: a second server on this vhost refuses to start, and so does a
    # replica configured apart from the running ones.
    place = ServerPlace(settings, sftp_fingerprint(settings))
    place.acquire()
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
    # Whether the broker's topology (queues, bindings, policies) is what the server expects, and what
    # differs; in the background, as the management API may be slow to answer.
    threading.Thread(target=check_topology, args=(settings,), name="morag-topology", daemon=True).start()

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
    # The webhooks of ended tasks, sent from a thread of this server (one replica sends each).
    courier = Courier(settings, services.deliveries, services.store, services.webhook_secrets).start()
    parts = server_parts(settings, control, liveness, files, time.time(), place, courier)
    capacity = services.capacity = CapacityProbe(settings, get_registry(settings))
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
        courier.stop()
        files.stop()
        liveness.stop()
        control.stop()
        broker.close()
        place.release()
