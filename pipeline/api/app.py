"""The HTTP API: submit files, follow tasks, fetch results. OpenAPI at ``/docs``."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any

from dramatiq import Broker
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from pipeline import __version__
from pipeline.api.admin import admin_router
from pipeline.api.auth import Authenticator
from pipeline.api.uploads import DailyQuota, Limits, receive_upload
from pipeline.api.workers import workers_router
from pipeline.brokers import PRIORITIES
from pipeline.errors import BadInput, TaskNotFound, UnsupportedType
from pipeline.outputs import check_output
from pipeline.routing import GPU_PREFERENCES
from pipeline.services import Services
from pipeline.store import State
from pipeline.submission import SubmitOptions, submit
from pipeline.transfer.checksums import FileRef

MEDIA_TYPES = {
    "json": "application/json",
    "srt": "application/x-subrip",
    "vtt": "text/vtt",
    "txt": "text/plain; charset=utf-8",
    "md": "text/markdown; charset=utf-8",
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
                            "description": "audio, video or document",
                        },
                        "priority": {"type": "string", "enum": list(PRIORITIES), "default": "normal"},
                        "gpu": {"type": "string", "enum": list(GPU_PREFERENCES), "default": "prefer"},
                        "language": {"type": "string"},
                        "model": {"type": "string"},
                    },
                }
            }
        },
    }
}


def create_app(
    services: Services,
    broker: Broker,
    gpu_workers: Callable[[], int | None],
    auth: Authenticator,
    health: Callable[[], tuple[bool, dict[str, Any]]] = lambda: (True, {}),
) -> FastAPI:
    """The API over ``services``; tasks are published through ``broker``.

    ``gpu_workers`` tells how many GPU workers are connected (None: unknown);
    ``auth`` checks API keys and roles; ``health`` says whether every part of
    the server works, and how each stands (``pipeline.health.report``).
    """
    readonly = [Depends(auth.require("readonly"))]
    client = [Depends(auth.require("client"))]
    app = FastAPI(
        title="morag-pipeline",
        version=__version__,
        description="Submit audio, video and documents; follow their tasks; fetch results.",
    )
    settings = services.settings
    uploads = settings.data_dir / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)

    def get_task(task_id: str) -> dict[str, Any]:
        try:
            return services.store.get(task_id).to_dict()
        except TaskNotFound:
            raise HTTPException(404, f"no task {task_id}") from None

    @app.get("/healthz", tags=["health"], responses={503: {"description": "a part of the server is down"}})
    def healthz(response: Response) -> dict[str, Any]:
        """Each part of the server: broker, control consumer, liveness scheduler, SFTP; 503 if one is down."""
        ok, parts = health()
        if not ok:
            response.status_code = 503
        return {"status": "ok" if ok else "degraded", "version": __version__, "parts": parts}

    models = settings.whisper_allowed_models or [settings.whisper_model]

    def check_option(name: str, value: str) -> None:
        """Refuse a Whisper model not allowed, as soon as the field arrives."""
        if name == "model" and value and value not in models:
            raise HTTPException(
                400, f"model {value!r} is not allowed here; allowed: {', '.join(models)} "
                "(MORAG_WHISPER_ALLOWED_MODELS)",
            )  # fmt: skip

    limits = Limits(
        settings.max_upload_mb * 1024 * 1024,
        settings.max_document_mb * 1024 * 1024,
        min_free_bytes=settings.min_free_disk_mb * 1024 * 1024,
        check_field=check_option,
    )
    quota = DailyQuota(settings.quota_mb_per_day * 1024 * 1024, services.store)

    @app.post(
        "/api/v1/tasks", status_code=201, tags=["tasks"], dependencies=client, openapi_extra=UPLOAD_FORM
    )
    async def create_task(request: Request) -> dict[str, Any]:
        """Upload a file and queue it; the task record says where it went and why.

        Form fields: ``file`` (audio, video or document), ``priority``, ``gpu``,
        ``language``, ``model``.
        """
        principal = request.state.principal
        key = principal.key_id or principal.name
        left = await run_in_threadpool(quota.left, key)
        upload = await receive_upload(request, uploads, limits, max_bytes=left)
        await run_in_threadpool(quota.charge, key, upload.size)
        try:
            options = SubmitOptions(
                priority=upload.fields.get("priority") or "normal",
                gpu=upload.fields.get("gpu") or "prefer",
                language=upload.fields.get("language") or None,
                model=upload.fields.get("model") or None,
            )
            task = await run_in_threadpool(
                submit, services, broker, upload.path, upload.filename, upload.sha256, upload.size,
                options, gpu_workers,
            )  # fmt: skip
        except UnsupportedType as exc:
            raise HTTPException(415, str(exc)) from None
        except BadInput as exc:
            raise HTTPException(400, str(exc)) from None
        finally:
            upload.path.unlink(missing_ok=True)
        return task.to_dict()

    @app.get("/api/v1/tasks", tags=["tasks"], dependencies=readonly)
    def list_tasks(
        state: State | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
    ) -> dict[str, Any]:
        tasks = services.store.list(state=state, limit=limit, offset=offset)
        return {"tasks": [t.to_dict() for t in tasks], "counts": services.store.counts()}

    @app.get("/api/v1/tasks/{task_id}", tags=["tasks"], dependencies=readonly)
    def show_task(task_id: str) -> dict[str, Any]:
        return get_task(task_id)

    @app.get(
        "/api/v1/tasks/{task_id}/result",
        tags=["tasks"],
        dependencies=readonly,
        response_class=PlainTextResponse,
        responses={409: {"description": "the task is not done"}},
    )
    def task_result(
        task_id: str,
        format: Annotated[str | None, Query(description="json | srt | vtt | txt | md")] = None,
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

    admin = [Depends(auth.require("admin"))]
    app.include_router(admin_router(services, broker, read=readonly, write=client, admin=admin))
    app.include_router(workers_router(services, broker, read=readonly, admin=admin))

    @app.middleware("http")
    async def timing(request, call_next):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        response = await call_next(request)
        response.headers["Server-Timing"] = f"app;dur={1000 * (time.perf_counter() - started):.1f}"
        return response

    return app
