"""OpenAI-compatible speech endpoints, backed by the fleet: any OpenAI client can use the GPU workers.

``POST /v1/audio/transcriptions`` and ``POST /v1/audio/translations`` take
OpenAI's multipart form (``file``, ``model``, ``language``, ``prompt``,
``response_format``, ``timestamp_granularities[]``, ``temperature``), submit a
normal task (the same routing, priorities, GPU fallback and lifecycle as
``POST /api/v1/tasks``), wait up to ``MORAG_OPENAI_WAIT_S`` for it to end and
answer in the format asked. A task still running then is answered with 504 and
its id; it goes on, and ``GET /api/v1/tasks/<id>`` follows it. ``GET /v1/models``
lists the models a client may ask for. The API key comes as a Bearer token, and
every error under ``/v1/`` has OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

from dramatiq import Broker
from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.api.auth import Access
from pipeline.api.tasks import intake
from pipeline.api.uploads import receive_upload
from pipeline.config import Settings
from pipeline.errors import BadInput, UnsupportedType
from pipeline.kinds import TRANSCRIBE
from pipeline.logs import get_logger
from pipeline.outputs import check_output
from pipeline.processors.speech_options import LANGUAGES, BadOption, SpeechOptions
from pipeline.processors.transcripts import Transcript
from pipeline.services import Services
from pipeline.store import FINAL_STATES, State, Task
from pipeline.submission import SubmitOptions, submit
from pipeline.transfer.checksums import FileRef

logger = get_logger(__name__)

PREFIX = "/v1/"
RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
GRANULARITIES = ("word", "segment")
#: OpenAI's model name, accepted for the server's configured model.
OPENAI_MODEL = "whisper-1"
#: Seconds between two reads of a waited task.
POLL_S = 0.25
#: The output each plain response format is.
PLAIN_OUTPUTS = {"text": "txt", "srt": "srt", "vtt": "vtt"}
#: OpenAI's error type of each HTTP status.
ERROR_TYPES = {403: "permission_error", 429: "rate_limit_error", 504: "timeout"}


class OpenAIError(HTTPException):
    """An error in OpenAI's shape: its status, message, and the ``param`` and ``code`` it names."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, **headers: str
    ) -> None:
        super().__init__(status, message, headers=headers or None)
        self.param = param
        self.code = code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object for an HTTP status: 5xx are ``server_error``, 4xx ``invalid_request_error``
    but for ``ERROR_TYPES``."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def openai_errors(request: Request, exc: Exception) -> Response:
    """Errors under ``/v1/`` in OpenAI's shape; every other path keeps FastAPI's."""
    assert isinstance(exc, StarletteHTTPException)
    if not request.url.path.startswith(PREFIX):
        return await http_exception_handler(request, exc)
    code = getattr(exc, "code", None) or ("invalid_api_key" if exc.status_code == 401 else None)
    body = error_body(exc.status_code, str(exc.detail), getattr(exc, "param", None), code)
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


@dataclasses.dataclass
class SpeechRequest:
    """What one OpenAI request asks, from its form fields (``parse_fields``)."""

    response_format: str = "json"
    granularities: tuple[str, ...] = ()
    options: SubmitOptions = dataclasses.field(default_factory=SubmitOptions)


def parse_fields(fields: dict[str, list[str]], settings: Settings, translate: bool) -> SpeechRequest:
    """The request's form fields checked; OpenAIError (400, naming the field) when one is wrong.

    The model is one of ``allowed_models``, or ``whisper-1`` (or none) for the
    workers' configured one, as a task that names no model gets.
    """

    def one(name: str) -> str | None:
        values = fields.get(name) or [""]
        return values[-1].strip() or None

    allowed = allowed_models(settings)
    model = one("model") or OPENAI_MODEL
    if model != OPENAI_MODEL and model not in allowed:
        raise OpenAIError(
            404, f"the model {model!r} does not exist here; the models are {', '.join(allowed)} "
            f"and {OPENAI_MODEL} (the configured one)", "model", "model_not_found",
        )  # fmt: skip
    response_format = one("response_format") or "json"
    if response_format not in RESPONSE_FORMATS:
        raise OpenAIError(
            400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, not {response_format!r}",
            "response_format",
        )  # fmt: skip
    granularities = tuple(
        fields.get("timestamp_granularities[]", []) + fields.get("timestamp_granularities", [])
    )
    for value in granularities:
        if value not in GRANULARITIES:
            raise OpenAIError(
                400, f"timestamp_granularities[] must be word or segment, not {value!r}",
                "timestamp_granularities[]",
            )  # fmt: skip
    options = SubmitOptions(
        priority=one("priority") or "normal",
        gpu=one("gpu") or "prefer",
        model=None if model == OPENAI_MODEL else model,
        language=None if translate else one("language"),
        task="translate" if translate else None,
        prompt=one("prompt"),
        temperature=one("temperature"),
        word_timestamps=True if "word" in granularities else None,
    )
    try:
        SpeechOptions.parse(dataclasses.asdict(options)).check_model(options.model or settings.whisper_model)
    except BadOption as exc:
        raise OpenAIError(400, str(exc), exc.option) from None
    return SpeechRequest(response_format, granularities, options)


def allowed_models(settings: Settings) -> list[str]:
    """The models a request may name: ``MORAG_WHISPER_ALLOWED_MODELS``, else the configured one."""
    return settings.whisper_allowed_models or [settings.whisper_model]


def verbose_json(transcript: Transcript, granularities: tuple[str, ...]) -> dict[str, Any]:
    """OpenAI's ``verbose_json``: segments unless only words were asked, words when asked.

    Segments carry no tokens (``tokens`` is empty) and ``seek`` is 0.
    """
    body: dict[str, Any] = {
        "task": transcript.task,
        "language": LANGUAGES.get(transcript.language, transcript.language),
        "duration": transcript.duration,
        "text": transcript.text,
    }
    if "segment" in granularities or not granularities:
        body["segments"] = [
            {
                "id": i,
                "seek": 0,
                "start": s.start,
                "end": s.end,
                "text": s.text,
                "tokens": [],
                "temperature": s.temperature or 0.0,
                "avg_logprob": s.avg_logprob or 0.0,
                "compression_ratio": s.compression_ratio or 0.0,
                "no_speech_prob": s.no_speech_prob or 0.0,
            }
            for i, s in enumerate(transcript.segments)
        ]
    if "word" in granularities:
        body["words"] = [{"word": w.word.strip(), "start": w.start, "end": w.end} for w in transcript.words]
    return body


def speech_form(translate: bool) -> dict[str, Any]:
    """The OpenAPI description of an endpoint's multipart form."""
    fields: dict[str, Any] = {
        "file": {"type": "string", "format": "binary", "description": "audio or video"},
        "model": {"type": "string", "default": OPENAI_MODEL},
        "prompt": {"type": "string"},
        "response_format": {"type": "string", "enum": list(RESPONSE_FORMATS), "default": "json"},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
    }
    if not translate:
        fields["language"] = {"type": "string"}
        fields["timestamp_granularities[]"] = {"type": "array", "items": {"enum": list(GRANULARITIES)}}
    schema = {"type": "object", "required": ["file"], "properties": fields}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def openai_router(
    services: Services, broker: Broker, gpu_workers: Callable[[], int | None], access: Access
) -> APIRouter:
    """Routes under ``/v1``; tasks are published through ``broker`` as ``POST /api/v1/tasks`` does."""
    router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])
    settings = services.settings
    store = services.store
    uploads, limits, quota = intake(services)

    @router.get("/models", dependencies=access.read)
    def list_models() -> dict[str, Any]:
        """The Whisper models a client may ask for (``MORAG_WHISPER_ALLOWED_MODELS``, else the
        configured one); ``whisper-1`` is accepted for the configured one."""
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "morag-pipeline"}
                for m in allowed_models(settings)
            ],
        }

    async def speech(request: Request, translate: bool) -> Response:
        principal = request.state.principal
        key = principal.key_id or principal.name
        fields: dict[str, list[str]] = {}

        def check_field(name: str, value: str) -> None:  # each field as it arrives, before the file
            fields.setdefault(name, []).append(value)
            if name == "model":
                parse_fields({"model": [value]}, settings, translate)

        left = await run_in_threadpool(quota.left, key)
        upload = await receive_upload(
            request, uploads, dataclasses.replace(limits, check_field=check_field), max_bytes=left
        )
        try:
            asked = parse_fields(fields, settings, translate)
            await run_in_threadpool(quota.charge, key, upload.size)
            task = await run_in_threadpool(
                submit, services, broker, upload.path, upload.filename, upload.sha256, upload.size,
                asked.options, gpu_workers, kinds=(TRANSCRIBE.name,),
            )  # fmt: skip
        except UnsupportedType as exc:
            raise OpenAIError(415, str(exc), "file", "unsupported_file") from None
        except BadOption as exc:
            raise OpenAIError(400, str(exc), exc.option) from None
        except BadInput as exc:
            raise OpenAIError(400, str(exc), "file") from None
        finally:
            upload.path.unlink(missing_ok=True)
        await run_in_threadpool(store.set_owner, task.id, key)
        started = time.monotonic()
        task = await wait_for(task.id, request)
        logger.info(
            "openai request answered",
            extra={"task_id": task.id, "state": task.state, "worker": task.worker,
                   "format": asked.response_format, "wait_s": round(time.monotonic() - started, 3)},
        )  # fmt: skip
        return await run_in_threadpool(answer, task, asked)

    async def wait_for(task_id: str, request: Request) -> Task:
        """The task once it has ended; OpenAIError 504 past ``MORAG_OPENAI_WAIT_S``, or when the client
        went away (the task goes on either way)."""
        deadline = time.monotonic() + settings.openai_wait_s
        while True:
            task = await run_in_threadpool(store.get, task_id, events=False)
            if task.state in FINAL_STATES:
                return task
            if time.monotonic() >= deadline or await request.is_disconnected():
                logger.info("openai request left its task running", extra={"task_id": task_id})
                raise OpenAIError(
                    504, f"task {task_id} has not ended after {settings.openai_wait_s:g} s "
                    "(MORAG_OPENAI_WAIT_S); it goes on: follow it with GET /api/v1/tasks/"
                    f"{task_id} or `morag-pipeline status {task_id}`", None, "task_pending",
                    **{"X-Task-Id": task_id},
                )  # fmt: skip
            await asyncio.sleep(POLL_S)

    def output(task: Task, fmt: str) -> bytes:
        ref = next(o for o in task.outputs if o["format"] == fmt)
        checked = FileRef.from_dict(check_output(task.id, task.kind, ref))
        return services.files.resolve_plain(checked.path).read_bytes()

    def answer(task: Task, asked: SpeechRequest) -> Response:
        headers = {"X-Task-Id": task.id}
        if task.state != State.done:
            raise OpenAIError(500, f"task {task.id} {task.state}: {task.error}", None, f"task_{task.state}",
                              **headers)  # fmt: skip
        fmt = asked.response_format
        if fmt in PLAIN_OUTPUTS:  # text/plain, as OpenAI answers them
            return PlainTextResponse(output(task, PLAIN_OUTPUTS[fmt]), headers=headers)
        transcript = Transcript.from_dict(json.loads(output(task, "json")))
        if fmt == "json":
            return JSONResponse({"text": transcript.text}, headers=headers)
        return JSONResponse(verbose_json(transcript, asked.granularities), headers=headers)

    answers = {504: {"description": "the task had not ended in time; it goes on (X-Task-Id)"}}

    @router.post(
        "/audio/transcriptions",
        dependencies=access.write,
        openapi_extra=speech_form(False),
        responses=answers,
    )
    async def transcriptions(request: Request) -> Response:
        """Transcribe an audio or video file, as OpenAI's endpoint of that name (docs/openai.md)."""
        return await speech(request, translate=False)

    @router.post(
        "/audio/translations", dependencies=access.write, openapi_extra=speech_form(True), responses=answers
    )
    async def translations(request: Request) -> Response:
        """Translate speech into English, as OpenAI's endpoint of that name (docs/openai.md)."""
        return await speech(request, translate=True)

    return router


def add_openai_api(
    app: FastAPI, services: Services, broker: Broker, gpu_workers: Callable[[], int | None], access: Access
) -> None:
    """Serve the OpenAI-compatible endpoints on ``app``, their errors in OpenAI's shape."""
    app.include_router(openai_router(services, broker, gpu_workers, access))
    app.add_exception_handler(StarletteHTTPException, openai_errors)
