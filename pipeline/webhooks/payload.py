"""The JSON a webhook carries: a summary of the ended task, with links to its outputs."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from pipeline.config import Settings
from pipeline.store import Task


def result_path(task_id: str, fmt: str) -> str:
    """The API path of one output of a task."""
    return f"/api/v1/tasks/{quote(task_id)}/result?format={quote(fmt)}"


def summary(task: Task, delivery_id: str, settings: Settings) -> dict[str, Any]:
    """What is sent when ``task`` ended.

    Each output is named by its format, with its API path and its URL under
    the first of ``MORAG_SERVER_URL`` (fetch it with an API key, as any result),
    its SHA-256 and size. ``timings`` are the seconds of each stage of the
    task's run (``pipeline.timings``), where the worker reported them.
    """
    base = settings.server_urls[0]
    outputs = [
        {
            "format": output["format"],
            "path": result_path(task.id, output["format"]),
            "url": base + result_path(task.id, output["format"]),
            "sha256": output.get("sha256"),
            "size": output.get("size"),
        }
        for output in task.outputs
    ]
    return {
        "delivery_id": delivery_id,
        "event": f"task.{task.state.value}",
        "task_id": task.id,
        "state": task.state.value,
        "kind": task.kind,
        "filename": task.filename,
        "error": task.error,
        "outputs": outputs,
        "timings": (task.result or {}).get("timings") or {},
        "created_at": task.created_at,
        "started_at": task.started_at,
        "ended_at": task.finished_at,
    }
