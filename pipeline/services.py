"""The server's long-lived parts, built once per process from the configuration."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import Settings, get_settings
from pipeline.security.apikeys import ApiKeyStore
from pipeline.security.keys import server_secret
from pipeline.security.tokens import TokenStore
from pipeline.store import TaskStore
from pipeline.transfer.local import LocalStore


@dataclass
class Services:
    settings: Settings
    store: TaskStore
    files: LocalStore
    tokens: TokenStore
    apikeys: ApiKeyStore


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
    )


_current: Services | None = None


def get_services() -> Services:
    """This process's services, built from ``get_settings()`` on first use."""
    global _current
    if _current is None or _current.settings is not get_settings():
        _current = build_services(get_settings())
    return _current
