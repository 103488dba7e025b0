"""A task's output manifest: uploaded last, it says that the outputs are complete.

``tasks/<task_id>/output/.manifest.json`` lists the output references and the
result summary. A worker uploads it after every output, atomically like any
upload, so its presence means every output is in place. A redelivered task
whose manifest exists is not run again: the worker reports the manifest's
outputs instead (idempotency). Output names never start with a dot
(``safe_name``), so the manifest cannot collide with one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.transfer.transport import Transport

MANIFEST_NAME = ".manifest.json"


def manifest_path(task_id: str) -> str:
    return f"tasks/{task_id}/output/{MANIFEST_NAME}"


@dataclass
class Manifest:
    """The outputs of a task that ran to the end, and its result summary."""

    outputs: list[dict[str, Any]]
    result: dict[str, Any]


def read_manifest(transport: Transport, task_id: str) -> Manifest | None:
    """The task's manifest, or None when its outputs are not complete.

    A damaged manifest counts as absent: the task runs again and rewrites it.
    """
    data = transport.read_small(manifest_path(task_id))
    if data is None:
        return None
    try:
        parsed = json.loads(data)
        return Manifest(outputs=list(parsed["outputs"]), result=dict(parsed["result"]))
    except (ValueError, KeyError, TypeError):
        return None


def write_manifest(transport: Transport, task_id: str, manifest: Manifest, folder: Path) -> None:
    """Upload the manifest; call it after every output is uploaded."""
    local = folder / "manifest.json"
    local.write_text(
        json.dumps({"task_id": task_id, "outputs": manifest.outputs, "result": manifest.result}),
        encoding="utf-8",
    )
    transport.upload(local, manifest_path(task_id))
