"""The server's long-lived parts, built once per process from the configuration."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config import Settings, get_settings
from pipeline.security.apikeys import ApiKeyStore
from pipeline.security.keys import server_secret
from pipeline.security.tokens import TokenStore
from pipeline.security.webhook_secrets import WebhookSecrets
from pipeline.store import TaskStore
from pipeline.transfer.local import LocalStore
from pipeline.webhooks.deliveries import DeliveryStore


@dataclass
class Services:
    settings: Settings
    store: TaskStore
    files: LocalStore
    tokens: TokenStore
    apikeys: ApiKeyStore
    deliveries: DeliveryStore
    webhook_secrets: WebhookSecrets
    # What is known of the workers when a task's next stage is routed (``routing.WorkerView``):
    # the server's capacity probe, the embedded mode's one worker; None: nothing.
    capacity: Callable[[], Any] | None = None


def build_services(settings: Settings) -> Services:
    """The stores of a server; InsecureSecret without a proper secret outside dev mode."""
    secret = server_secret(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return Services(
        settings,
        TaskStore(settings),
        LocalStore(settings.files_dir),
        TokenStore(settings, secret),
        ApiKeyStore(settings),
        DeliveryStore(settings),
        WebhookSecrets(settings, secret),
    )


_current: Services | None = None


def get_services() -> Services:
    """This process's services, built from ``get_settings()`` on first use."""
    global _current
    if _current is None or _current.settings is not get_settings():
        _current = build_services(get_settings())
    return _current
