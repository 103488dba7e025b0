"""``morag-pipeline run``: one file through the same actors, in this process.

No RabbitMQ and no server: Dramatiq's stub broker, a worker thread on every
queue, and a throwaway data directory.
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dramatiq import Worker
from pydantic import SecretStr

from pipeline.brokers import install
from pipeline.brokers.stub import build_stub_broker
from pipeline.config import FileAccess, Settings, use_settings
from pipeline.services import Services, get_services
from pipeline.store import FINAL_STATES, Task
from pipeline.submission import SubmitOptions, submit, submit_url


@contextmanager
def embedded_pipeline(settings: Settings) -> Iterator[tuple[Services, object]]:
    """A stub broker with a worker on every queue, over a temporary data directory."""
    data_dir = Path(tempfile.mkdtemp(prefix="morag-run-"))
    try:
        # In-process only, nothing listens: a throwaway secret signs the reports
        # the in-process worker sends its in-process server, as on a server's host.
        secret = SecretStr(secrets.token_urlsafe(48))
        update = {
            "data_dir": data_dir,
            "secret_key": secret,
            "dev_mode": False,
            "file_access": FileAccess.shared,
        }
        settings = use_settings(settings.model_copy(update=update))
        broker = install(build_stub_broker(settings))
        import pipeline.actors.control  # noqa: F401
        import pipeline.actors.cpu  # noqa: F401

        services = get_services()  # the control actors' own, so that they see its capacity too
        services.capacity = lambda: 1  # the one in-process worker serves the GPU queue too
        worker = Worker(broker, worker_threads=1, worker_timeout=100)
        worker.start()
        try:
            yield services, broker
        finally:
            worker.stop()
            broker.close()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def run_file(
    services: Services,
    broker: object,
    path: Path | str,
    options: SubmitOptions,
    on_update: Callable[[Task], None] = lambda task: None,
) -> Task:
    """Submit ``path`` (a file, or a URL the worker fetches) to the embedded pipeline and wait
    until its task ends."""
    if isinstance(path, str):
        return _wait(services, submit_url(services, broker, path, options, gpu_workers=lambda: 1), on_update)
    upload = services.settings.data_dir / "uploads" / "run-upload"
    upload.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with path.open("rb") as src, upload.open("wb") as dst:
        while chunk := src.read(1024 * 1024):
            digest.update(chunk)
            dst.write(chunk)
    task = submit(
        services, broker, upload, path.name, digest.hexdigest(), path.stat().st_size,
        options, gpu_workers=lambda: 1,
    )  # fmt: skip
    return _wait(services, task, on_update)


def _wait(services: Services, task: Task, on_update: Callable[[Task], None]) -> Task:
    while task.state not in FINAL_STATES:
        time.sleep(0.2)
        task = services.store.get(task.id)
        on_update(task)
    return task
