"""A RabbitMQ user per worker, limited to its queues, through the management HTTP API.

RabbitMQ checks configure and read permissions per queue, write permission per
exchange, and, on topic exchanges, topic permissions per routing key. A
worker's user may consume only its capability's queues and the cancellation
stream, and may publish only through the ``morag`` topic exchange with the
routing keys of the queues it needs: ``control`` for its reports, its own
queues for redeliveries, retries and dead-letter reasons, and ``cpu`` for a GPU
worker's fallback. The default exchange, which reaches every queue, is closed to it.
"""

from __future__ import annotations

import re
import secrets
import urllib.parse

import httpx

from pipeline.brokers.cancellations import STREAM
from pipeline.brokers.rabbitmq import EXCHANGE
from pipeline.config import Settings
from pipeline.errors import PipelineError
from pipeline.middleware.delivery_count import StartMarks
from pipeline.security.tokens import TokenRecord


class BrokerAdminError(PipelineError):
    """The management API refused or could not be reached."""


def permissions(capability: str) -> dict[str, str]:
    """Vhost permissions: declare and consume its own queues, declare (not consume) the
    queues it publishes to, read the cancellation stream, publish through ``morag`` only.

    The default exchange, which reaches every queue, is closed to it; which routing keys
    it may publish with on ``morag`` is narrowed by ``topic_permissions``. It binds
    nothing: the server declares the exchange and its bindings at start.
    """
    own = rf"{capability}(\.DQ|\.XQ)?"
    cancellations = re.escape(STREAM)
    declared = "control|cpu" if capability == "gpu" else "control"
    marks = rf"{re.escape(StartMarks.PREFIX)}.+"  # start marks of the tasks it runs
    return {
        "configure": rf"^({own}|({declared})(\.DQ|\.XQ)?|{cancellations}|{marks})$",
        "write": rf"^{EXCHANGE}$",
        "read": rf"^({own}|{cancellations}|{marks})$",
    }


def topic_permissions(capability: str) -> dict[str, str]:
    """The routing keys it may publish with on ``morag``: its reports to ``control``; its own
    queue, delay queue and dead letters (redeliveries, retries, dead-letter reasons); and,
    for a GPU worker, ``cpu``, where the GPU fallback moves a task."""
    targets = rf"control|{capability}(\.DQ|\.XQ)?" + ("|cpu" if capability == "gpu" else "")
    return {"exchange": EXCHANGE, "write": rf"^({targets})$", "read": "^$"}


def _admin(settings: Settings) -> tuple[httpx.Client, str, urllib.parse.SplitResult]:
    amqp = urllib.parse.urlsplit(settings.broker_url.get_secret_value())
    auth = (urllib.parse.unquote(amqp.username or "guest"), urllib.parse.unquote(amqp.password or "guest"))
    vhost = urllib.parse.unquote(amqp.path.lstrip("/")) or "/"
    client = httpx.Client(base_url=settings.broker_management_url, auth=auth, timeout=10)
    return client, urllib.parse.quote(vhost, safe=""), amqp


def _check(response: httpx.Response, what: str) -> None:
    if response.status_code >= 400:
        raise BrokerAdminError(
            f"RabbitMQ management API refused to {what}: {response.status_code} {response.text}"
        )


def create_worker_user(settings: Settings, record: TokenRecord, broker_url: str) -> str:
    """Create (or reset) the worker's RabbitMQ user; returns the broker URL with its credentials."""
    password = secrets.token_urlsafe(24)
    client, vhost, _ = _admin(settings)
    user = urllib.parse.quote(record.worker, safe="")
    try:
        with client:
            _check(
                client.put(f"/api/users/{user}", json={"password": password, "tags": ""}), "create the user"
            )
            _check(
                client.put(f"/api/permissions/{vhost}/{user}", json=permissions(record.capability)),
                "set the user's permissions",
            )
            _check(
                client.put(
                    f"/api/topic-permissions/{vhost}/{user}", json=topic_permissions(record.capability)
                ),
                "set the user's topic permissions",
            )
    except httpx.HTTPError as exc:
        raise BrokerAdminError(f"cannot reach RabbitMQ's management API: {exc}") from None
    target = urllib.parse.urlsplit(broker_url)
    host = target.hostname or "127.0.0.1"
    netloc = f"{user}:{urllib.parse.quote(password, safe='')}@{host}" + (
        f":{target.port}" if target.port else ""
    )
    return urllib.parse.urlunsplit((target.scheme, netloc, target.path, target.query, ""))


def delete_worker_user(settings: Settings, name: str) -> None:
    client, _, _ = _admin(settings)
    try:
        with client:
            response = client.delete(f"/api/users/{urllib.parse.quote(name, safe='')}")
    except httpx.HTTPError as exc:
        raise BrokerAdminError(f"cannot reach RabbitMQ's management API: {exc}") from None
    if response.status_code not in (204, 404):
        _check(response, "delete the user")
