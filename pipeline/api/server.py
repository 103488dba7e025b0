"""``morag-pipeline server``: the API, and the consumer of the ``control`` queue."""

from __future__ import annotations

import pika
import uvicorn
from dramatiq import Worker

from pipeline.api.app import create_app
from pipeline.api.auth import Authenticator
from pipeline.brokers import QUEUES, current_broker
from pipeline.brokers.rabbitmq import connection_parameters
from pipeline.config import Settings, redact_url
from pipeline.errors import PipelineError
from pipeline.liveness import CapacityProbe
from pipeline.logs import get_logger
from pipeline.registry import get_registry
from pipeline.scheduler import start_liveness
from pipeline.security.audit import open_audit_log
from pipeline.security.ratelimit import FailureLimiter
from pipeline.services import get_services
from pipeline.transfer.serving import start_file_services

logger = get_logger(__name__)


class BrokerUnreachable(PipelineError):
    """RabbitMQ did not answer."""


def check_broker(settings: Settings) -> None:
    try:
        pika.BlockingConnection(connection_parameters(settings)).close()
    except Exception as exc:
        url = redact_url(settings.broker_url.get_secret_value())
        raise BrokerUnreachable(f"cannot reach RabbitMQ at {url}: {exc or type(exc).__name__}") from None


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    check_broker(settings)
    services = get_services()
    broker = current_broker()
    import pipeline.actors.control  # noqa: F401
    import pipeline.actors.cpu  # noqa: F401  (registers every task actor, for publishing)
    import pipeline.actors.liveness  # noqa: F401

    for queue in QUEUES:
        broker.declare_queue(queue, ensure=True)

    def broker_ok() -> bool:
        try:
            check_broker(settings)
            return True
        except BrokerUnreachable:
            return False

    if settings.dev_mode:
        logger.warning("development mode: requests without an API key act as admin; never expose this")
    open_audit_log(settings.data_dir / "audit.log", settings.audit_max_bytes, settings.audit_backups)
    limiter = FailureLimiter(settings.auth_max_failures, settings.auth_failure_window_s)
    auth = Authenticator(services.apikeys, services.tokens, limiter, dev_mode=settings.dev_mode)
    app = create_app(services, broker, CapacityProbe(settings, get_registry(settings)), auth, broker_ok)
    # SFTP server (its host key fingerprint is logged) and store retention.
    files = start_file_services(settings, services.store, services.files, services.tokens)
    # One thread keeps task events in the order workers sent them.
    control = Worker(broker, queues={"control"}, worker_threads=1)
    control.start()
    # The one periodiq scheduler and the sweep, in a child process.
    liveness = start_liveness(settings)
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
