"""From an uploaded file (or a URL) to a published task message.

Used by the API and by the embedded ``run`` mode alike: classify the content,
choose the route, move the file into the task store, record the task
(``record``, ``record_url``), and publish its message to the chosen queue
(``deliver``). A stage that hands a file on (a fetched URL that answered with a
recording) makes the task go on as the kind of that file's content (``hand_on``).

The task record is the outbox: it is written before its message is
published, and marked published once the broker confirmed the message. A
server that dies between the two, or a broker that stays away longer than
``MORAG_PUBLISH_WAIT_S``, leaves the task queued and unpublished, and the
reconciler (``pipeline.fleet.reconciler``) publishes it on its next sweep.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

from dramatiq import Broker

from pipeline.config import Settings
from pipeline.errors import BadInput, TaskNotFound, UnsupportedType
from pipeline.kinds import TRANSCRIBE, first_stage, kind_of
from pipeline.logs import get_logger
from pipeline.outputs import output_folder
from pipeline.processors.speech_options import KEYS as SPEECH_KEYS
from pipeline.processors.speech_options import SpeechOptions
from pipeline.routing import (
    Classification,
    Route,
    WorkerView,
    as_capacity,
    choose_route,
    classify,
    classify_url,
    fit_job,
    shown_name,
    url_filename,
)
from pipeline.security.audit import audit
from pipeline.security.grants import DEFAULT_CAPABILITY, issue_grant
from pipeline.services import Services
from pipeline.store import State, Task, new_task_id
from pipeline.task_message import build_job, model_affinity
from pipeline.transfer.checksums import FileRef
from pipeline.transfer.manifest import manifest_path
from pipeline.webhooks.deliveries import Callback

logger = get_logger(__name__)


@dataclass
class SubmitOptions:
    """What a submit asks: the route (priority, gpu), the model, and the transcription options
    (``pipeline.processors.speech_options``; values as typed or as a form sends them)."""

    priority: str = "normal"
    gpu: str = "prefer"
    language: str | None = None
    model: str | None = None
    task: str | None = None
    word_timestamps: bool | str | None = None
    vad: bool | str | None = None
    prompt: str | None = None
    temperature: float | str | None = None
    max_words_per_cue: int | str | None = None

    def to_options(self, kind: str, settings: Settings) -> dict[str, Any]:
        """The task's options, checked: BadOption for one that is wrong, or that the model cannot
        honour in a transcription (by the model's name: the worker checks the loaded model too)."""
        speech = SpeechOptions.parse(asdict(self))
        if kind == TRANSCRIBE.name:
            speech.check_model(self.model or settings.whisper_model)
        plain = {k: v for k, v in asdict(self).items() if v is not None and k not in SPEECH_KEYS}
        return {**plain, **speech.to_options()}


def grant_for(services: Services, task_id: str, input_path: str | None, queue: str | None = None) -> str:
    """A transfer grant for one task: read its input (a task of a URL has none), read and write
    its outputs.

    The grant is issued to the workers of ``queue`` (gpu or cpu; by default
    the queue the store routes the task to now, gpu for a task it does not
    know): only their tokens may present it, or those of a queue the task is
    rerouted to later.
    """
    if queue is None:
        try:
            queue = str(services.store.get(task_id, events=False).route["queue"])
        except TaskNotFound:
            queue = DEFAULT_CAPABILITY
    inputs = [input_path] if input_path else []
    return issue_grant(services.tokens.secret, task_id, inputs, services.settings.grant_ttl_s, queue)


def publish(broker: Broker, task: Task, settings: Settings, grant: str | None = None) -> str:
    """Publish a task's message to its route's queue; returns the message id.

    Dramatiq picks the queue from the actor, so the message is copied onto the
    routed queue before it is published.
    """
    actor = broker.get_actor(kind_of(task.kind).actor)
    job = build_job(task, grant, affinity_for(task, settings))
    # The limit on the queue the task is on now: the route may have moved since submit.
    limit = fit_job(job, task.route["queue"], settings).time_limit_s
    message = actor.message_with_options(
        kwargs={"job": job}, broker_priority=task.route["broker_priority"], time_limit=limit * 1000
    ).copy(queue_name=task.route["queue"])
    broker.enqueue(message)
    return message.message_id


def affinity_for(task: Task, settings: Settings) -> dict[str, Any] | None:
    """The live workers of the task's queue that hold the Whisper model it asks for, from their
    heartbeats (``pipeline.fleet.registry``); None for other kinds, or when none holds it.

    A registry that cannot be read gives no affinity: the task goes to whichever worker takes it.
    """
    if task.kind != TRANSCRIBE.name:
        return None
    from pipeline.fleet.registry import get_registry

    model = task.options.get("model") or settings.whisper_model
    queue = task.route["queue"]
    try:
        live = get_registry(settings).live(queue)
    except Exception as exc:
        logger.warning(
            "model affinity skipped: registry unreadable", extra={"task_id": task.id, "error": str(exc)}
        )
        return None
    holders = [w.id for w in live if any(m.rpartition("@")[0] == model for m in w.models)]
    return model_affinity(model, queue, holders)


def record(
    services: Services,
    upload: Path,
    filename: str,
    sha256: str,
    size: int,
    options: SubmitOptions,
    gpu_workers: Callable[[], WorkerView],
    callback: Callback | None = None,
    kinds: tuple[str, ...] | None = None,
) -> Task:
    """Classify and route an uploaded file and record its task, unpublished. Raises BadInput for
    content refused, BadOption for options refused (nothing is kept of either).

    ``gpu_workers`` says what is known of the workers: the number of live GPU
    workers, or a ``Capacity`` with each queue's load too (None: unknown).
    ``callback``: the webhook the task's end is POSTed to, if any.
    ``kinds``: the kinds of task the caller takes (None: any); other content is UnsupportedType.
    """
    found = classify(upload, filename, services.settings)
    if kinds is not None and found.kind not in kinds:
        raise UnsupportedType(
            f"{shown_name(filename)}: {found.format} content makes a {found.kind} task; "
            f"only {' or '.join(kinds)} tasks are taken here"
        )
    stored = options.to_options(found.kind, services.settings)
    found = replace(found, kind=first_stage(found.kind, found.duration, services.settings))
    task_id = new_task_id()
    route = route_for(services, found, options, gpu_workers)
    ref = services.files.add_input(task_id, filename, upload, sha256, size)
    name = Path(filename.replace("\\", "/")).name or "upload"
    task_input = {**ref.to_dict(), "media": media_facts(found, services.settings)}
    return _create(services, task_id, found, name, task_input, stored, route, callback)


def record_url(
    services: Services,
    url: str,
    options: SubmitOptions,
    gpu_workers: Callable[[], WorkerView],
    callback: Callback | None = None,
) -> Task:
    """Record the task of a URL, unpublished: a worker fetches it. Raises BadInput (UnsafeURL)
    for a URL that may not be fetched; nothing is recorded then."""
    found = classify_url(url, services.settings)
    stored = options.to_options(found.kind, services.settings)
    route = route_for(services, found, options, gpu_workers)
    task_id = new_task_id()
    services.files.task_dir(task_id).mkdir(parents=True)  # where a worker makes the output folder
    task_input = {"url": url, "media": found.to_dict()}
    return _create(services, task_id, found, url_filename(url), task_input, stored, route, callback)


def media_facts(found: Classification, settings: Settings) -> dict[str, Any]:
    """What the task's record and its message say of its input; for a recording to be cut into
    chunks, the chunk length too (the server's setting, whatever the cutting worker's is)."""
    facts = found.to_dict()
    if kind_of(found.kind).chunks_as:
        facts["chunk_s"] = settings.split_chunk_s
    return facts


def route_for(
    services: Services, found: Classification, options: SubmitOptions, gpu_workers: Callable[[], WorkerView]
) -> Route:
    known = gpu_workers() if kind_of(found.kind).prefers_gpu and options.gpu == "prefer" else None
    return choose_route(
        found, services.settings, priority=options.priority, gpu=options.gpu, capacity=as_capacity(known)
    )


def _create(
    services: Services,
    task_id: str,
    found: Classification,
    filename: str,
    task_input: dict[str, Any],
    options: dict[str, Any],
    route: Route,
    callback: Callback | None,
) -> Task:
    task = Task(
        id=task_id,
        kind=found.kind,
        state=State.queued,
        filename=filename,
        input=task_input,
        options=options,
        route=route.to_dict(),
    )
    services.store.create(task, callback)
    if route.fallback:
        detail = {"from": "gpu", "to": route.queue, "reason": route.fallback, "by": "submit"}
        services.store.add_event(task_id, "rerouted", detail)
        audit(
            "task.rerouted",
            task=task_id,
            source="gpu",
            target=route.queue,
            reason=route.fallback,
            by="submit",
        )
    return task


def deliver(services: Services, broker: Broker, task: Task, by: str, wait_s: float | None = None) -> bool:
    """Publish the task's message with a fresh grant, trying through a broker restart for up to
    ``wait_s`` seconds (default ``MORAG_PUBLISH_WAIT_S``); then mark it published.

    False when the broker stayed away: the task stays in the outbox (an event
    says so) and the reconciler publishes it later.
    """
    wait_s = services.settings.publish_wait_s if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    pause = 0.5
    while True:
        try:
            grant = grant_for(services, task.id, task.input.get("path"), task.route["queue"])
            message_id = publish(broker, task, services.settings, grant)
            break
        except Exception as exc:
            if time.monotonic() + pause > deadline:
                reason = f"broker unreachable ({type(exc).__name__}: {exc}); the server publishes it later"
                services.store.add_event(task.id, "publish pending", {"reason": reason, "by": by})
                logger.warning("task not published yet", extra={"task_id": task.id, "error": str(exc)})
                return False
            time.sleep(pause)
            pause = min(pause * 2, 5.0)
    services.store.mark_published(task.id, message_id, task.route["queue"], by)
    logger.info(
        "task published",
        extra={
            "task_id": task.id,
            "queue": task.route["queue"],
            "priority": task.route["priority"],
            "by": by,
        },
    )
    return True


def submit(
    services: Services,
    broker: Broker,
    upload: Path,
    filename: str,
    sha256: str,
    size: int,
    options: SubmitOptions,
    gpu_workers: Callable[[], WorkerView],
    callback: Callback | None = None,
    kinds: tuple[str, ...] | None = None,
) -> Task:
    """Turn an uploaded file into a queued task (``record``) and publish it (``deliver``).

    Raises BadInput for content refused (``kinds``: see ``record``). A broker that stays away
    does not fail the task: it is recorded, and published as soon as the broker is back.
    """
    task = record(services, upload, filename, sha256, size, options, gpu_workers, callback, kinds)
    deliver(services, broker, task, by="submit")
    return services.store.get(task.id)


def submit_url(
    services: Services,
    broker: Broker,
    url: str,
    options: SubmitOptions,
    gpu_workers: Callable[[], WorkerView],
    callback: Callback | None = None,
) -> Task:
    """Turn a URL into a queued task (``record_url``) and publish it (``deliver``)."""
    task = record_url(services, url, options, gpu_workers, callback)
    deliver(services, broker, task, by="submit")
    return services.store.get(task.id)


#: The options a task's record keeps, by name.
OPTION_NAMES = frozenset(f.name for f in dataclass_fields(SubmitOptions))


def hand_on(
    services: Services,
    broker: Broker,
    task: Task,
    handed: dict[str, Any],
    result: dict[str, Any],
    worker: str,
    nonce: str | None = None,
) -> bool:
    """A stage of ``task`` ended with a file to go on with (``handed``, checked in the store): the
    task goes on as the kind of that file's content, routed anew; False when it could not.

    The file becomes the task's input (linked, not copied) and leaves the outputs; the
    stage's manifest is removed, so that the next stage's worker runs. A file no kind takes,
    or too large for its kind, fails the task, naming the stage. The next stage's
    message is published at once when the broker answers, else by the reconciler.
    """
    settings = services.settings
    stage = task.kind
    ref = FileRef.from_dict(handed)
    try:
        found = classify(services.files.resolve_plain(ref.path), task.filename, settings)
        found = replace(found, kind=first_stage(found.kind, found.duration, settings))
        kind = kind_of(found.kind)
        if (too_large := kind.too_large(ref.size, settings)) is not None:
            raise BadInput(f"{task.filename}: {too_large}")
        options = SubmitOptions(**{k: v for k, v in task.options.items() if k in OPTION_NAMES})
        route = route_for(services, found, options, services.capacity or (lambda: None))
    except BadInput as exc:
        if services.store.mark_failed(task.id, f"{stage} stage: {exc}", worker, nonce=nonce):
            # Nothing left behind: the download and the stage's manifest go.
            shutil.rmtree(services.files.resolve_plain(output_folder(task.id)), ignore_errors=True)
        return False
    services.files.resolve_plain(manifest_path(task.id)).unlink(missing_ok=True)
    taken = services.files.output_as_input(task.id, ref, task.filename)
    stages = [*task.input.get("stages", []), {"kind": stage, "worker": worker, "result": result}]
    task_input = {**taken.to_dict(), "media": media_facts(found, settings), "stages": stages}
    if "url" in task.input:
        task_input["url"] = task.input["url"]
    summary = f"{stage} done; goes on as {kind.name} ({found.format}) on {route.queue}"
    detail = {"summary": summary, "stage": stage, "next": kind.name, "queue": route.queue, "worker": worker}
    if not services.store.next_stage(task.id, kind.name, task_input, route.to_dict(), detail, nonce=nonce):
        return False
    # A retry of this completion is ignored from here on: the task's kind is no longer the stage's.
    services.files.resolve_plain(ref.path).unlink(missing_ok=True)
    logger.info("task goes on", extra={"task_id": task.id, "stage": stage, "next": kind.name, "by": worker})
    deliver(services, broker, services.store.get(task.id, events=False), by="stage", wait_s=0)
    return True


def hand_on_url(
    services: Services,
    broker: Broker,
    task: Task,
    result: dict[str, Any],
    worker: str,
    nonce: str | None = None,
) -> bool:
    """A stage of ``task`` ended with its URL to go on with as another kind that takes URLs
    (``result["goes_on_as"]``: a page that embeds a video goes on as a media URL); False when
    it could not. The task keeps its URL, its history and the stage's result."""
    stage = task.kind
    try:
        kind = kind_of(str(result["goes_on_as"]))
        if not kind.takes_url or "url" not in task.input or kind.name == stage:
            raise BadInput(f"cannot go on as {kind.name}: it does not take this task's URL")
    except (KeyError, BadInput) as exc:
        services.store.mark_failed(task.id, f"{stage} stage: {exc}", worker, nonce=nonce)
        return False
    url = task.input["url"]
    found = Classification(kind.name, "url", "text/uri-list", len(url.encode()))
    options = SubmitOptions(**{k: v for k, v in task.options.items() if k in OPTION_NAMES})
    route = route_for(services, found, options, services.capacity or (lambda: None))
    services.files.resolve_plain(manifest_path(task.id)).unlink(missing_ok=True)
    stages = [*task.input.get("stages", []), {"kind": stage, "worker": worker, "result": result}]
    task_input = {"url": url, "media": found.to_dict(), "stages": stages}
    summary = f"{stage} done; goes on as {kind.name} on {route.queue}"
    if reason := result.get("reason"):
        summary += f": {reason}"
    detail = {"summary": summary, "stage": stage, "next": kind.name, "queue": route.queue, "worker": worker}
    if not services.store.next_stage(task.id, kind.name, task_input, route.to_dict(), detail, nonce=nonce):
        return False
    logger.info("task goes on", extra={"task_id": task.id, "stage": stage, "next": kind.name, "by": worker})
    deliver(services, broker, services.store.get(task.id, events=False), by="stage", wait_s=0)
    return True


def carried(task: Task) -> dict[str, Any]:
    """What the task's earlier stages carry to its final result (``result["carry"]`` of each):
    the metadata and subtitles of a media URL's download."""
    found: dict[str, Any] = {}
    for stage in task.input.get("stages", []):
        carry = stage.get("result", {}).get("carry")
        if isinstance(carry, dict):
            found.update(carry)
    return found
