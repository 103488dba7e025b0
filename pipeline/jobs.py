"""What a worker does with a task message, free of Dramatiq.

A job is the dict a task message carries (see ``task_message.build_job``):
task id, input reference (path, sha256, size; a URL for a web task), what the
input is, options and route. ``run_job`` fetches the input into a private
temporary folder, verifies it, runs its kind's runner (``pipeline.kinds``),
uploads the outputs and then the manifest that says they are complete, and
returns their references. The folder is removed whatever happens.

A job is idempotent: when the task's manifest already exists (a redelivered
message whose first run got that far), nothing runs again and the manifest's
outputs are returned. ``should_stop`` cancels: it is polled between stages
and between transcript segments, and a canceled job raises ``TaskCanceled``
before it uploads anything.

Every stage is timed (``pipeline.timings``): ``download_s``, ``upload_s``
(the outputs), ``manifest_s`` (looking for a finished manifest, before and
after the run) and ``report_s`` (the reports sent between stages) join the
runner's own stages in the result's ``timings``. The manifest's own upload
cannot be in the result it holds: it is part of the run's rest.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from pipeline.config import Settings
from pipeline.errors import AccessRefused, TaskCanceled, UnprovenMessage
from pipeline.kinds import Outputs, kind_of
from pipeline.outputs import output_folder, output_name
from pipeline.processors import Progress, documents, media, slots, whisper
from pipeline.processors.speech_options import SpeechOptions
from pipeline.processors.transcripts import FORMATS
from pipeline.timings import Stopwatch
from pipeline.transfer.checksums import FileRef
from pipeline.transfer.manifest import Manifest, read_manifest, write_manifest
from pipeline.transfer.transport import Transport

TMP_PREFIX = "morag-task-"


class Events(Protocol):
    def progress(self, task_id: str, stage: str, percent: float) -> None: ...


def authorize_job(transport: Transport, job: dict[str, Any]) -> None:
    """Present the job's transfer grant, before anything is said of its task.

    Raises UnprovenMessage when the grant is missing or opens nothing (the
    server did not send this message), TaskEnded when its task has ended.
    """
    task_id = job["task_id"]
    grant = job.get("grant")
    if not grant:
        raise UnprovenMessage(f"task {task_id}: the message carries no transfer grant")
    try:
        transport.authorize(task_id, grant)
    except UnprovenMessage:
        raise
    except AccessRefused as exc:
        raise UnprovenMessage(str(exc)) from None


def run_job(
    job: dict[str, Any],
    *,
    settings: Settings,
    transport: Transport,
    events: Events,
    should_stop: Callable[[], bool] = lambda: False,
    watch: Stopwatch | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Process one job; returns (output references, result summary).

    When the outputs are already complete the summary has ``reused: True``.
    ``watch`` times the stages (a new one unless the caller already timed some,
    such as the report that the task started); the summary's ``timings`` hold
    them with the runner's own.
    """
    task_id = job["task_id"]
    kind = kind_of(job["kind"])
    ref = FileRef.from_dict(job["input"]) if "path" in job["input"] else None
    watch = watch if watch is not None else Stopwatch()

    def progress(stage: str, percent: float) -> None:
        """A report sent by the runner: timed as part of the runner's stage it falls in."""
        events.progress(task_id, stage, percent)

    def report(stage: str, percent: float) -> None:
        """A report sent between stages: timed as the report stage."""
        with watch.stage("report"):
            events.progress(task_id, stage, percent)

    def check_stop(stage: str) -> None:
        if should_stop():
            raise TaskCanceled(f"canceled while {stage}")

    with watch.stage("manifest"):
        done = _finished(transport, task_id, kind.name)
    if done is not None:
        return done.outputs, {**done.result, "reused": True}
    # The process id in the name lets a later worker remove what a killed one left.
    with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{os.getpid()}-") as tmp:
        folder = Path(tmp)
        check_stop("waiting")
        local, download_s = None, 0.0
        if ref is not None:
            report("downloading", 0.0)
            started = time.perf_counter()
            local = transport.download(ref, folder / ("input" + Path(ref.name).suffix))
            download_s = time.perf_counter() - started
            watch.add("download", download_s)
            check_stop("downloading")
        outputs, summary = kind.run()(job, local, folder, settings, progress, should_stop)
        summary["kind"] = kind.name  # which stage these outputs are of (pipeline.submission.hand_on)
        check_stop(kind.working)
        # Another delivery of this task may have finished meanwhile (its worker
        # lost the broker but not the store): its outputs stand, not a second set.
        with watch.stage("manifest"):
            done = _finished(transport, task_id, kind.name)
        if done is not None:
            return done.outputs, {**done.result, "reused": True}
        report("uploading", 0.0)
        started = time.perf_counter()
        refs = []
        for fmt, content in outputs.items():
            path = content if isinstance(content, Path) else folder / f"out.{fmt}"
            if isinstance(content, bytes):
                path.write_bytes(content)
            elif isinstance(content, str):
                path.write_text(content, encoding="utf-8")
            name = output_name(job["filename"], fmt)  # the server refuses any other name
            uploaded = transport.upload(path, output_folder(task_id) + name)
            refs.append({**uploaded.to_dict(), "format": fmt})
        upload_s = time.perf_counter() - started
        watch.add("upload", upload_s)
        summary["transfer"] = {  # what the server's metrics count (pipeline.metrics)
            "download_s": round(download_s, 3),
            "download_bytes": ref.size if ref is not None else 0,
            "upload_s": round(upload_s, 3),
            "upload_bytes": sum(r["size"] for r in refs),
        }
        # The manifest holds the result as reported: its own upload is in the run's rest.
        summary["timings"] = {**summary.get("timings", {}), **watch.timings()}
        write_manifest(transport, task_id, Manifest(refs, summary), folder)
    return refs, summary


def _finished(transport: Transport, task_id: str, kind: str) -> Manifest | None:
    """The task's manifest when it holds the outputs of this kind's stage (a task that went on
    to another stage may still hold the manifest of the one before)."""
    done = read_manifest(transport, task_id)
    return done if done is not None and done.result.get("kind", kind) == kind else None


def transcribe(
    job: dict[str, Any],
    local: Path,
    folder: Path,
    settings: Settings,
    progress: Progress,
    should_stop: Callable[[], bool],
) -> tuple[Outputs, dict[str, Any]]:
    """The runner of transcriptions: audio decoded to WAV, transcribed, rendered in every format.

    Its timings: ``probe_s`` (only when the job carries no duration from the server's
    probe), ``decode_s``, ``slot_s`` (waiting for a transcription slot: another task held the
    model), the model's ``load_s`` and ``transcribe_s``, and ``render_s``.

    Only the model's work holds a slot (``pipeline.processors.slots``): on a GPU-queue worker
    this task's download and decode run while another transcribes, its render and upload after
    its slot is given back. The summary's ``clock`` says when (Unix time) the decode and the
    model's work began and ended, to see that overlap.
    """
    options = job.get("options", {})
    watch = Stopwatch()
    progress("extracting audio", 0.0)
    found = job.get("media") or {}
    span = found.get("slice")  # a chunk of a long recording (pipeline.chunks): its seconds alone
    duration = found.get("duration")
    if duration is None:  # the server's probe found none: ffprobe here, once, for the decode's time bound
        with watch.stage("probe"):
            info = media.probe(local)
        duration = info.duration if info is not None else 0.0
    clock: dict[str, float] = {"decode_started": time.time()}
    with watch.stage("decode"):
        audio = media.extract_audio(
            local, folder / "audio.wav", duration=duration, span=tuple(span) if span else None
        )
    clock["decode_ended"] = time.time()
    with watch.stage("slot"):
        if not slots.slots.take(should_stop, on_wait=lambda: progress("waiting for the model", 0.0)):
            raise TaskCanceled("canceled while waiting for the model")  # the task before it runs on
    try:
        clock["model_started"] = time.time()
        transcript = whisper.transcribe(
            audio,
            model=options.get("model") or settings.whisper_model,
            device=settings.whisper_device.value,
            compute_type=settings.whisper_compute_type,
            language=settings.whisper_language,
            beam_size=settings.whisper_beam_size,
            options=SpeechOptions.parse(options),
            progress=progress,
            should_stop=should_stop,
            source=job["filename"],
            max_loaded=settings.whisper_max_loaded_models,
            batched=settings.whisper_batched.value,
            batch_size=settings.whisper_batch_size,
            cpu_threads=settings.whisper_cpu_threads,
            concurrency=slots.slots.size,  # the transcriptions this process runs at once
            allowed=settings.whisper_allowed_models,
        )
    finally:
        slots.slots.give()
        clock["model_ended"] = time.time()
    transcript.timings.update(watch.timings())  # the JSON transcript holds them too
    with watch.stage("render"):
        outputs: Outputs = {fmt: render(transcript) for fmt, render in FORMATS.items()}
    summary = {
        "language": transcript.language,
        "language_probability": transcript.language_probability,
        "task": transcript.task,
        "duration": transcript.duration,
        "model": transcript.model,
        "device": transcript.device,
        "compute_type": transcript.compute_type,
        "inference": transcript.inference,
        "timings": {**transcript.timings, **watch.timings()},
        "segments": len(transcript.segments),
        "words": len(transcript.words),
        "clock": {name: round(at, 3) for name, at in clock.items()},
    }
    return outputs, summary


def convert(
    job: dict[str, Any],
    local: Path,
    folder: Path,
    settings: Settings,
    progress: Progress,
    should_stop: Callable[[], bool],
) -> tuple[Outputs, dict[str, Any]]:
    doc = documents.convert(
        local,
        job["media"]["format"],
        artifacts_path=settings.docling_artifacts_path,
        progress=progress,
        source=job["filename"],
        max_memory_mb=settings.document_max_memory_mb,
        time_limit_s=settings.document_time_limit_s,
    )
    outputs: Outputs = {"md": doc.markdown}
    if doc.docling is not None:
        outputs["json"] = json.dumps(doc.docling, ensure_ascii=False)
    summary = {
        "format": doc.doc_format,
        "pages": doc.pages,
        "method": doc.method,
        "notes": doc.notes,
        "timings": doc.timings,
    }
    return outputs, summary
