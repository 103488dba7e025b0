"""The server's long-lived parts, built once per process from the configuration."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import Settings, get_settings
from pipeline.store import TaskStore
from pipeline.transfer.local import LocalStore


@dataclass
class Services:
    settings: Settings
    store: TaskStore
    files: LocalStore


def build_services(settings: Settings) -> Services:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return Services(settings, TaskStore(settings.db_path), LocalStore(settings.files_dir))


_current: Services | None = None


def get_services() -> Services:
    """This process's services, built from ``get_settings()`` on first use."""
    global _current
    if _current is None or _current.settings is not get_settings():
        _current = build_services(get_settings())
    return _current
