"""Tasks over HTTP: submit a file, list and show tasks, fetch a result, cancel."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import pika
from dramatiq import Broker
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from pipeline import chunks
from pipeline.api.auth import Access, acting_name
from pipeline.api.uploads import DailyQuota, Limits, is_form, receive_form, receive_upload
from pipeline.brokers import PRIORITIES
from pipeline.brokers.cancellations import publish_cancel
from pipeline.brokers.rabbitmq import connection_parameters
from pipeline.errors import BadInput, TaskNotFound, UnsupportedType
from pipeline.kinds import KINDS
from pipeline.logs import get_logger
from pipeline.netsafety import UnsafeURL
from pipeline.outputs import check_output
from pipeline.processors.speech_options import KEYS as SPEECH_KEYS
from pipeline.processors.speech_options import TASKS as WHISPER_TASKS
from pipeline.routing import GPU_PREFERENCES
from pipeline.security.audit import audit
from pipeline.services import Services
from pipeline.store import State, Task
from pipeline.submission import SubmitOptions, submit, submit_url
from pipeline.transfer.checksums import FileRef
from pipeline.webhooks.courier import check_target
from pipeline.webhooks.deliveries import Callback

logger = get_logger(__name__)

MEDIA_TYPES = {
    "json": "application/json",
    "srt": "application/x-subrip",
    "vtt": "text/vtt",
    "txt": "text/plain; charset=utf-8",
    "md": "text/markdown; charset=utf-8",
    "morag": "text/markdown; charset=utf-8",
}
OPTIONS = {
    "priority": {"type": "string", "enum": list(PRIORITIES), "default": "normal"},
    "gpu": {"type": "string", "enum": list(GPU_PREFERENCES), "default": "prefer"},
    "language": {"type": "string", "description": "a Whisper language code, or auto"},
    "model": {"type": "string"},
    "callback_url": {
        "type": "string",
        "format": "uri",
        "description": "POSTed a signed summary when the task ends (docs/webhooks.md)",
    },
    "task": {"type": "string", "enum": list(WHISPER_TASKS)},
    "word_timestamps": {"type": "boolean"},
    "vad": {"type": "boolean"},
    "prompt": {"type": "string"},
    "temperature": {"type": "number", "minimum": 0, "maximum": 1},
    "max_words_per_cue": {"type": "integer", "minimum": 1},
}
UPLOAD_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "audio, video, document or image",
                        },
                        **OPTIONS,
                    },
                }
            },
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "required": ["url"],
                    "properties": {
                        "url": {"type": "string", "description": "a web page or file, fetched by a worker"},
                        **OPTIONS,
                    },
                }
            },
        },
    }
}


class CancelRequest(BaseModel):
    reason: str = "canceled by the user"


def submit_options(fields: dict[str, str]) -> SubmitOptions:
    """The options of a submit from its form fields."""
    return SubmitOptions(
        priority=fields.get("priority") or "normal",
        gpu=fields.get("gpu") or "prefer",
        **{name: fields.get(name) or None for name in ("model", *SPEECH_KEYS)},
    )


def upload_limits(services: Services) -> Limits:
    """What an upload may be, from the settings; a Whisper model not allowed is refused as it arrives."""
    settings = services.settings
    models = settings.whisper_allowed_models or [settings.whisper_model]

    def check_option(name: str, value: str) -> None:
        if name == "model" and value and value not in models:
            raise HTTPException(
                400, f"model {value!r} is not allowed here; allowed: {', '.join(models)} "
                "(MORAG_WHISPER_ALLOWED_MODELS)",
            )  # fmt: skip
        if name == "callback_url" and value:
            try:  # its form, before the file arrives; its addresses once it has
                check_target(value, settings, resolve=False)
            except UnsafeURL as exc:
                raise HTTPException(400, f"callback_url: {exc}") from None

    return Limits(
        {kind.name: kind.max_bytes(settings) for kind in KINDS.values()},
        min_free_bytes=settings.min_free_disk_mb * 1024 * 1024,
        check_field=check_option,
    )


def intake(services: Services) -> tuple[Path, Limits, DailyQuota]:
    """Where uploads land (created if missing), what they may be, and each API key's daily quota."""
    uploads = services.settings.data_dir / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    return (
        uploads,
        upload_limits(services),
        DailyQuota(services.settings.quota_mb_per_day * 1024 * 1024, services.store),
    )


def tasks_router(
    services: Services, broker: Broker, gpu_workers: Callable[[], int | None], access: Access
) -> APIRouter:
    """Routes under ``/api/v1/tasks``; tasks are published through ``broker``.

    ``gpu_workers`` tells how many GPU workers are connected (None: unknown).
    """
    router = APIRouter(prefix="/api/v1/tasks", tags=["tasks"])
    settings = services.settings
    store = services.store
    uploads, limits, quota = intake(services)

    def get_task(task_id: str) -> dict[str, Any]:
        try:
            return shown(store.get(task_id))
        except TaskNotFound:
            raise HTTPException(404, f"no task {task_id}") from None

    def shown(task: Task) -> dict[str, Any]:
        """A task's record as the API answers it: with its webhook (None: submitted without one)."""
        webhook = services.deliveries.get(task.id)
        return {**task.to_dict(), "webhook": webhook.view() if webhook else None}

    @router.post(
        "",
        status_code=201,
        dependencies=access.write,
        openapi_extra=UPLOAD_FORM,
        responses={
            200: {"description": "the task an earlier request with this Idempotency-Key made"},
            409: {"description": "a request with this Idempotency-Key is still being received"},
        },
    )
    async def create_task(request: Request, response: Response) -> dict[str, Any]:
        """Upload a file, or name a URL, and queue it; the task record says where it went and why.

        Form fields: ``file`` (audio, video, document or image) in a multipart
        body, or ``url`` (a web page or file a worker fetches) in an urlencoded
        one; ``priority``, ``gpu``, ``model``, ``callback_url`` (POSTed a signed
        summary when the task ends; a private address is refused unless
        ``MORAG_FETCH_ALLOW_PRIVATE``) and the transcription options
        ``language``, ``task``, ``word_timestamps``, ``vad``, ``prompt``,
        ``temperature``, ``max_words_per_cue`` (docs/transcripts.md). With an
        ``Idempotency-Key`` header, the same key from the same API key within a
        day makes one task: a repeat gets that task with HTTP 200 (its file is
        not read).
        """
        principal = request.state.principal
        key = principal.key_id or principal.name
        idempotency = request.headers.get("idempotency-key")
        if idempotency is not None:
            earlier = await claim(key, idempotency, request)
            if earlier is not None:
                response.status_code = 200
                response.headers["Idempotent-Replayed"] = "true"
                return earlier
        try:
            task = await receive_and_submit(request, key)
        except BaseException:
            if idempotency is not None:
                await run_in_threadpool(store.release_idempotency, key, idempotency)
            raise
        if idempotency is not None:
            await run_in_threadpool(store.bind_idempotency, key, idempotency, task["id"])
        return task

    async def claim(owner: str, idempotency: str, request: Request) -> dict[str, Any] | None:
        """None when this request is the first with its key; else the task the first one made."""
        if not idempotency.strip() or len(idempotency) > 255:
            raise HTTPException(400, "Idempotency-Key must be 1 to 255 characters")
        found = await run_in_threadpool(store.claim_idempotency, owner, idempotency)
        if found is None:
            return None
        async for _ in request.stream():  # the repeat's file is not needed: read and drop it
            pass
        if found == "":
            raise HTTPException(
                409, "a request with this Idempotency-Key is still being received; try again shortly",
                headers={"Retry-After": "2"},
            )  # fmt: skip
        return await run_in_threadpool(get_task, found)

    async def receive_and_submit(request: Request, key: str) -> dict[str, Any]:
        """Receive the upload (or the URL) of ``key`` (an API key's id) and submit it; the new
        task's record."""
        if is_form(request):
            fields = await receive_form(request, limits)
            if not fields.get("url"):
                raise HTTPException(400, "send a file as multipart/form-data, or a 'url' field")
            callback = await checked_callback(fields.get("callback_url") or None, request)
            try:
                task = await run_in_threadpool(
                    submit_url, services, broker, fields["url"], submit_options(fields), gpu_workers, callback
                )
            except BadInput as exc:
                raise HTTPException(400, str(exc)) from None
            await run_in_threadpool(store.set_owner, task.id, key)
            return task.to_dict()
        left = await run_in_threadpool(quota.left, key)
        upload = await receive_upload(request, uploads, limits, max_bytes=left)
        try:
            callback = await checked_callback(upload.fields.get("callback_url") or None, request)
        except HTTPException:
            upload.path.unlink(missing_ok=True)
            raise
        await run_in_threadpool(quota.charge, key, upload.size)
        try:
            options = submit_options(upload.fields)
            task = await run_in_threadpool(
                submit, services, broker, upload.path, upload.filename, upload.sha256, upload.size,
                options, gpu_workers, callback,
            )  # fmt: skip
        except UnsupportedType as exc:
            raise HTTPException(415, str(exc)) from None
        except BadInput as exc:
            raise HTTPException(400, str(exc)) from None
        finally:
            upload.path.unlink(missing_ok=True)
        await run_in_threadpool(store.set_owner, task.id, key)
        return await run_in_threadpool(shown, task)

    async def checked_callback(callback_url: str | None, request: Request) -> Callback | None:
        """The task's webhook, its address checked (HTTP 400 with the reason when refused)."""
        if callback_url is None:
            return None
        try:
            await run_in_threadpool(check_target, callback_url, settings)
        except UnsafeURL as exc:
            raise HTTPException(400, f"callback_url: {exc}") from None
        return Callback(callback_url, request.state.principal.key_id)

    @router.get("", dependencies=access.read)
    def list_tasks(
        state: State | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
    ) -> dict[str, Any]:
        tasks = store.list(state=state, limit=limit, offset=offset)
        return {"tasks": [t.to_dict() for t in tasks], "counts": store.counts()}

    @router.get("/{task_id}", dependencies=access.read)
    def show_task(task_id: str) -> dict[str, Any]:
        return get_task(task_id)

    @router.get(
        "/{task_id}/result",
        dependencies=access.read,
        response_class=PlainTextResponse,
        responses={409: {"description": "the task is not done"}},
    )
    def task_result(
        task_id: str,
        format: Annotated[str | None, Query(description="json | srt | vtt | txt | md | morag")] = None,
    ) -> Response:
        """One output of a finished task; by default the transcript text or the Markdown."""
        task = get_task(task_id)
        if task["state"] != State.done:
            detail = task["error"] or f"task is {task['state']}"
            raise HTTPException(409, f"no result: {detail}")
        outputs = {o["format"]: o for o in task["outputs"]}
        wanted = format or ("txt" if "txt" in outputs else "md")
        if wanted not in outputs:
            raise HTTPException(404, f"no {wanted} output; this task has {', '.join(sorted(outputs))}")
        try:  # never a file outside the task's output folder, nor through a link
            ref = FileRef.from_dict(check_output(task_id, task["kind"], outputs[wanted]))
            content = services.files.resolve_plain(ref.path).read_bytes()
        except BadInput as exc:
            raise HTTPException(409, str(exc)) from None
        headers = {"X-Content-SHA256": ref.sha256}
        return Response(content, media_type=MEDIA_TYPES.get(wanted), headers=headers)

    @router.post(
        "/{task_id}/cancel",
        dependencies=access.write,
        responses={409: {"description": "the task already ended"}},
    )
    def cancel_task(task_id: str, http: Request, request: CancelRequest | None = None) -> dict[str, Any]:
        """Cancel a queued or running task.

        The task is ``canceled`` at once and for good; workers hear of it
        through the cancellation stream: a queued task is skipped when it
        reaches one, a running transcription stops at its next segment.
        """
        reason = (request or CancelRequest()).reason
        try:
            if not store.mark_canceled(task_id, reason):
                state = store.get(task_id, events=False).state
                raise HTTPException(409, f"task {task_id} is {state}: nothing to cancel")
        except TaskNotFound:
            raise HTTPException(404, f"no task {task_id}") from None
        audit("task.cancel", by=acting_name(http), task=task_id, reason=reason)
        notified = True

        def notify(canceled: str, why: str) -> None:
            nonlocal notified
            try:
                publish_cancel(connection_parameters(settings), canceled, why)
            except (pika.exceptions.AMQPError, OSError) as exc:
                # The task stays canceled: a worker that runs it anyway has its completion ignored.
                notified = False
                logger.warning("cancellation notice not sent", extra={"task_id": canceled, "error": str(exc)})
                store.add_event(canceled, "cancel notice not sent", {"error": str(exc)})

        notify(task_id, reason)
        # A long recording cut into chunks: every chunk is canceled with it.
        chunks.cancel_chunks(
            services, store.get(task_id, events=False), f"its task was canceled: {reason}", notify
        )
        return {**shown(store.get(task_id)), "notified": notified}

    return router
