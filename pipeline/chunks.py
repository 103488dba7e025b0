"""A long recording across the fleet: its chunks as tasks of their own, and one stitched result.

A recording longer than ``MORAG_SPLIT_OVER_S`` starts as a task of a cutting
stage (``pipeline.kinds.SPLIT``): a CPU worker finds cuts in the silences
(``pipeline.processors.cuts``). Its completion comes here (``fan_out``): each
slice [start, end) becomes a chunk, a task of the next kind whose input is the
same stored file (a second link to it) and whose media names its slice, routed
and published like any task, so that every idle worker, GPU or CPU, may take
one. The task itself waits, running, with no message of its own; its record
lists its chunks (``input["chunks"]``).

Each chunk's progress makes the task's (``chunk_progress``: the chunks' percent,
weighted by their length). When a chunk ends (``chunk_ended``) and all are done,
the server reads their JSON transcripts, shifts each by its chunk's start,
joins them (``pipeline.processors.transcripts.stitch``) and writes every output
format of the task from the one stitched transcript. A failed chunk fails the
task, naming it, and cancels the others; canceling the task cancels every chunk
(``cancel_chunks``). A chunk whose worker is lost is delivered again alone, as
any task is (``pipeline.fleet.reconciler``).

A chunk's id is its task's id, a dash, and its number (``<task>-003``);
listings of tasks leave chunks out.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from dramatiq import Broker

from pipeline.errors import TaskNotFound
from pipeline.kinds import kind_of
from pipeline.logs import get_logger
from pipeline.outputs import output_folder, output_name
from pipeline.processors.transcripts import FORMATS, Transcript, stitch
from pipeline.routing import Capacity, Classification, as_capacity, choose_route
from pipeline.services import Services
from pipeline.store import CHUNK_SEPARATOR, FINAL_STATES, State, Task
from pipeline.submission import OPTION_NAMES, SubmitOptions, deliver
from pipeline.transfer.checksums import FileRef

logger = get_logger(__name__)

#: What joins a task's id and a chunk's number in the chunk's id.
SEPARATOR = CHUNK_SEPARATOR


def chunk_id(task_id: str, number: int) -> str:
    return f"{task_id}{SEPARATOR}{number:03d}"


def parent_of(task: Task) -> str | None:
    """The id of the task ``task`` is a chunk of; None for a task that is no chunk."""
    parent = task.input.get("parent")
    return parent if isinstance(parent, str) else None


def chunks_of(task: Task) -> list[dict[str, Any]]:
    """The chunks of a task cut into chunks (id, start, end each); empty for any other."""
    chunks = task.input.get("chunks")
    return chunks if isinstance(chunks, list) else []


def fan_out(
    services: Services,
    broker: Broker,
    task: Task,
    result: dict[str, Any],
    worker: str,
    nonce: str | None = None,
) -> bool:
    """The cutting stage of ``task`` is done (``result["chunks"]``): record a chunk task for each
    slice, make the task wait on them, and publish them. False when the task already ended.

    Applied again (a retried completion), it records no chunk twice.
    """
    stage = kind_of(task.kind)
    kind = kind_of(stage.chunks_as or "")
    slices = [(float(start), float(end)) for start, end in result["chunks"]]
    options = SubmitOptions(**{k: v for k, v in task.options.items() if k in OPTION_NAMES})
    source = FileRef.from_dict(task.input)
    chunks = [{"id": chunk_id(task.id, n), "start": s, "end": e} for n, (s, e) in enumerate(slices)]
    known = services.store.records(c["id"] for c in chunks)
    # Each chunk is routed as if the ones before it were queued already: once the GPU queue
    # holds more than its workers finish sooner than a CPU worker would, chunks go to CPU too.
    view = Capacity()
    if kind.prefers_gpu and options.gpu == "prefer":
        view = as_capacity((services.capacity or (lambda: None))())
    made = []
    for number, chunk in enumerate(chunks):
        if chunk["id"] in known:
            continue
        span = chunk["end"] - chunk["start"]
        found = Classification(kind.name, task.input["media"]["format"], task.input["media"]["mime"], 0, span)
        route = choose_route(
            found, services.settings, priority=options.priority, gpu=options.gpu, capacity=view
        )
        view = _queued_on(view, route.queue)
        ref = services.files.output_as_input(chunk["id"], source, task.filename)
        media = {
            **task.input["media"],
            "kind": kind.name,
            "duration": span,
            "slice": [chunk["start"], chunk["end"]],
        }
        made.append(
            Task(
                id=chunk["id"],
                kind=kind.name,
                state=State.queued,
                filename=task.filename,
                input={**ref.to_dict(), "media": media, "parent": task.id, "chunk": number},
                options=task.options,
                route=route.to_dict(),
            )
        )
    for chunk_task in made:
        services.store.create(chunk_task)
    stages = [*task.input.get("stages", []), {"kind": stage.name, "worker": worker, "result": result}]
    task_input = {**task.input, "stages": stages, "chunks": chunks}
    detail = {
        "chunks": len(chunks),
        "worker": worker,
        "summary": f"cut into {len(chunks)} chunks by {worker}",
    }
    if not services.store.await_chunks(task.id, kind.name, task_input, detail, nonce=nonce):
        for chunk_task in made:  # the task ended meanwhile (canceled): its chunks with it
            services.store.mark_canceled(chunk_task.id, "its task had ended")
        return False
    logger.info("task cut into chunks", extra={"task_id": task.id, "chunks": len(chunks), "by": worker})
    for chunk_task in services.store.records(c["id"] for c in chunks).values():
        if chunk_task.state is State.queued and chunk_task.published_at is None:
            deliver(services, broker, chunk_task, by="cut", wait_s=0)
    return True


def _queued_on(view: Capacity, queue: str) -> Capacity:
    """``view`` with one more task waiting on ``queue`` (where its load is known)."""
    load = getattr(view, queue, None)
    if load is None:
        return view
    return replace(view, **{queue: replace(load, waiting=load.waiting + 1)})


def chunk_progress(services: Services, chunk: Task) -> None:
    """A chunk reported progress: its task's is the chunks' percent, weighted by their length."""
    parent_id = parent_of(chunk)
    if parent_id is None:
        return
    try:
        parent = services.store.get(parent_id, events=False)
    except TaskNotFound:
        return
    chunks = chunks_of(parent)
    if parent.state is not State.running or not chunks:
        return
    records = services.store.records(c["id"] for c in chunks)
    total = sum(c["end"] - c["start"] for c in chunks) or 1.0
    done = sum(1 for c in chunks if (r := records.get(c["id"])) is not None and r.state is State.done)
    running = sum(1 for c in chunks if (r := records.get(c["id"])) is not None and r.state is State.running)
    weighted = 0.0
    for c in chunks:
        record = records.get(c["id"])
        percent = 0.0
        if record is not None:
            percent = 100.0 if record.state is State.done else float(record.progress.get("percent") or 0.0)
        weighted += (c["end"] - c["start"]) * percent
    stage = f"transcribing: {done} of {len(chunks)} chunks done, {running} running"
    services.store.set_progress(parent.id, {"stage": stage, "percent": round(weighted / total, 1)})


def chunk_ended(services: Services, chunk: Task, notify: Callable[[str, str], None] | None = None) -> None:
    """A chunk ended: when every chunk of its task is done, stitch the task's outputs; when one
    failed or was canceled, fail the task and cancel the others (``notify``: see ``cancel_chunks``)."""
    parent_id = parent_of(chunk)
    if parent_id is not None:
        try:
            settle(services, services.store.get(parent_id, events=False), notify)
        except TaskNotFound:
            return


def settle(services: Services, parent: Task, cancel: Callable[[str, str], None] | None = None) -> bool:
    """End ``parent`` if its chunks say how: done, stitched, when all are done; failed when one
    failed or was canceled (the others canceled, each through ``cancel`` too). True if it ended."""
    chunks = chunks_of(parent)
    if parent.state in FINAL_STATES or not chunks:
        return False
    records = services.store.records(c["id"] for c in chunks)
    for number, c in enumerate(chunks):
        record = records.get(c["id"])
        if record is not None and record.state in (State.failed, State.canceled):
            what = record.error or str(record.state)
            reason = f"chunk {number} ({c['start']:.1f}-{c['end']:.1f}s) {record.state}: {what}"
            if services.store.mark_failed(parent.id, reason, record.worker):
                cancel_chunks(services, parent, f"another chunk of the task {record.state}", cancel)
                return True
            return False
    if not all((r := records.get(c["id"])) is not None and r.state is State.done for c in chunks):
        return False
    outputs, result = _stitched(services, parent, [records[c["id"]] for c in chunks])
    if services.store.mark_done(parent.id, outputs, result, "server"):
        logger.info("chunks stitched: task done", extra={"task_id": parent.id, "chunks": len(chunks)})
        return True
    return False


def cancel_chunks(
    services: Services, parent: Task, reason: str, notify: Callable[[str, str], None] | None = None
) -> list[str]:
    """Cancel every chunk of ``parent`` that has not ended; ``notify(chunk id, reason)`` tells the
    workers (the cancellation stream). Returns the ids canceled."""
    canceled = []
    for chunk in chunks_of(parent):
        if services.store.mark_canceled(chunk["id"], reason):
            canceled.append(chunk["id"])
            if notify is not None:
                notify(chunk["id"], reason)
    return canceled


def _stitched(
    services: Services, parent: Task, chunks: list[Task]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Write the task's outputs from its chunks' JSON transcripts, stitched; (outputs, result)."""
    parts = []
    for chunk in chunks:
        ref = next(o for o in chunk.outputs if o["format"] == "json")
        data = json.loads(services.files.resolve_plain(ref["path"]).read_text(encoding="utf-8"))
        parts.append((float(chunk.input["media"]["slice"][0]), Transcript.from_dict(data)))
    transcript = stitch(parts, source=parent.filename)
    outputs = []
    for fmt, render in FORMATS.items():
        content = render(transcript).encode("utf-8")
        path = output_folder(parent.id) + output_name(parent.filename, fmt)
        final = services.files.resolve_plain(path)
        final.parent.mkdir(parents=True, exist_ok=True)
        # Two chunks ending at once may both stitch: each writes its own file, then renames it.
        partial = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.partial")
        partial.write_bytes(content)
        os.replace(partial, final)
        outputs.append(
            {"path": path, "sha256": hashlib.sha256(content).hexdigest(), "size": len(content), "format": fmt}
        )
    result = {
        "kind": parent.kind,
        "language": transcript.language,
        "language_probability": transcript.language_probability,
        "task": transcript.task,
        "duration": transcript.duration,
        "model": transcript.model,
        "device": transcript.device,
        "compute_type": transcript.compute_type,
        "inference": transcript.inference,
        "timings": transcript.timings,
        "segments": len(transcript.segments),
        "words": len(transcript.words),
        "chunks": [
            {
                "id": chunk.id,
                "start": chunk.input["media"]["slice"][0],
                "end": chunk.input["media"]["slice"][1],
                "worker": chunk.worker,
                "queue": chunk.result.get("queue"),
                "device": chunk.result.get("device"),
            }
            for chunk in chunks
        ],
        "workers": sorted({chunk.worker for chunk in chunks if chunk.worker}),
        "worker": "server",
    }
    return outputs, result
