"""A RabbitMQ user per worker, limited to its queues, through the management HTTP API.

RabbitMQ checks configure and read permissions per queue and write
permission per exchange. A worker's user may declare and consume only its
capability's queues (``gpu``, ``gpu.DQ``, ``gpu.XQ``) and the cancellation
stream ``morag.cancellations``, and declare ``control``;
it publishes through the default exchange, which RabbitMQ cannot narrow to one
queue: what it could publish elsewhere is refused by signatures and transfer
grants, not by the broker (see docs/security.md).
"""

from __future__ import annotations

import secrets
import urllib.parse

import httpx

from pipeline.config import Settings
from pipeline.errors import PipelineError
from pipeline.security.tokens import TokenRecord


class BrokerAdminError(PipelineError):
    """The management API refused or could not be reached."""


def permissions(capability: str) -> dict[str, str]:
    """Consume its own queues; declare control (and, for GPU workers, cpu, where the GPU
    fallback moves a task); read the cancellation stream (pipeline.brokers.cancellations)."""
    own = rf"{capability}(\.DQ|\.XQ)?"
    cancellations = r"morag\.cancellations"
    declared = "control|cpu" if capability == "gpu" else "control"
    return {
        "configure": rf"^({own}|({declared})(\.DQ|\.XQ)?|{cancellations})$",
        "write": r"^amq\.default$",
        "read": rf"^({own}|{cancellations})$",
    }


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
