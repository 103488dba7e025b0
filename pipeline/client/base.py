"""What the synchronous and the asyncio client share: their servers, and what each call sends.

``Client`` and ``AsyncClient`` differ only in how they wait. Everything else is
here: the list of server URLs and the options of their connections
(``Servers``), the request each API call sends (``Call`` and the functions
below), how a failed connection of an event stream is told, and the
properties of a task's handle (``Handle``).
"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from pipeline.client import policy
from pipeline.client.board import TaskDict
from pipeline.client.errors import ClientError

#: Seconds one event stream stays open before the client opens the next (the server closes it then).
STREAM_S = 300.0
#: Seconds between reads of a task while its event stream cannot be opened.
POLL_S = 1.0
#: An upload may take long to send, and its answer comes once the server has checked the file.
UPLOAD_TIMEOUT = httpx.Timeout(30.0, write=None, read=600.0)
#: Called with a task's record each time it changes.
Progress = Callable[[TaskDict], None]


class Servers:
    """The server URLs a client tries in turn, the one it uses now, and its connections' options.

    Parameters:
      base_url: one URL, or several replicas' URLs separated by commas.
      api_key: sent as a bearer token when given.
      ca_file: the CA that signed an HTTPS server's certificate (else the system's).
      timeout: seconds to wait for a response.
    """

    def __init__(self, base_url: str, api_key: str | None, ca_file: Path | None, timeout: float) -> None:
        self.urls = [url.strip().rstrip("/") for url in base_url.split(",") if url.strip()]
        self.index = 0
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
        self.options: dict[str, Any] = {"timeout": timeout, "headers": headers, "verify": verify}

    @property
    def current(self) -> str:
        return self.urls[self.index]

    def next(self) -> str:
        """Move on to the next server; its URL."""
        self.index = (self.index + 1) % len(self.urls)
        return self.current

    def connect_failed(self, exc: httpx.ConnectError, turn: int) -> ClientError | None:
        """The error to raise after try ``turn`` could not connect; None: try the next server."""
        if policy.is_tls(exc):
            return policy.tls_failed(self.current, exc)
        if turn < len(self.urls) - 1:
            return None
        return policy.unreachable(self.urls)

    def stream_failed(self, exc: httpx.HTTPError) -> ClientError:
        """The error of an event stream that could not be opened or was cut."""
        if isinstance(exc, httpx.ConnectError):
            return (
                policy.tls_failed(self.current, exc)
                if policy.is_tls(exc)
                else policy.unreachable([self.current])
            )
        return policy.failed(self.current, exc)


@dataclass(frozen=True)
class Call:
    """One API request: its method, path and httpx's other arguments.

    ``safe``: whether it may be sent again after a timeout (None: GET only).
    """

    method: str
    url: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    safe: bool | None = None


def upload_form(path_or_url: str | Path, options: dict[str, Any]) -> tuple[dict[str, str], Path | None]:
    """The form fields of a submit and the file to send (None for a URL)."""
    data = {k: str(v) for k, v in options.items() if v is not None}
    text = str(path_or_url)
    if isinstance(path_or_url, str) and text.startswith(("http://", "https://")):
        return {**data, "url": text}, None
    return data, Path(path_or_url)


@contextmanager
def submit(path_or_url: str | Path, idempotency_key: str | None, options: dict[str, Any]) -> Iterator[Call]:
    """The submit of a file (open while the call is) or a URL. Every try of one call sends the same
    ``Idempotency-Key`` (a fresh one unless given), so a retried upload makes one task."""
    data, path = upload_form(path_or_url, options)
    headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
    kwargs: dict[str, Any] = {"data": data, "headers": headers, "timeout": UPLOAD_TIMEOUT}
    if path is None:
        yield Call("POST", "/api/v1/tasks", kwargs, safe=True)
        return
    with path.open("rb") as file:
        yield Call("POST", "/api/v1/tasks", {**kwargs, "files": {"file": (path.name, file)}}, safe=True)


def task(task_id: str) -> Call:
    return Call("GET", f"/api/v1/tasks/{task_id}")


def result(task_id: str, fmt: str | None) -> Call:
    return Call("GET", f"/api/v1/tasks/{task_id}/result", {"params": {"format": fmt} if fmt else {}})


def cancel(task_id: str, reason: str | None) -> Call:
    return Call("POST", f"/api/v1/tasks/{task_id}/cancel", {"json": {"reason": reason} if reason else None})


def events(task_ids: list[str] | None, last_event_id: str | None, timeout: float) -> Call:
    """The event stream of ``task_ids`` (None: the API key's tasks), resumed after ``last_event_id``;
    the server closes it after ``timeout`` seconds."""
    params: dict[str, Any] = {"timeout": f"{timeout:.3f}"}
    if task_ids is not None:
        params["task"] = task_ids
    headers = {"Accept": "text/event-stream", **({"Last-Event-ID": last_event_id} if last_event_id else {})}
    return Call(
        "GET",
        "/api/v1/events",
        {"params": params, "headers": headers, "timeout": httpx.Timeout(30.0, read=timeout + 30.0)},
    )


def rewinder(kwargs: dict[str, Any]) -> Any:
    """A function that puts every file a request uploads back at its start (before a retry)."""
    files = kwargs.get("files") or {}

    def rewind() -> None:
        for _, upload in files.values():
            upload.seek(0)

    return rewind


def stream_ended(status: int | None) -> bool:
    """Whether an event stream that failed with ``status`` (None: no answer) is to be read around
    (the tasks read one by one, then the stream tried again) rather than raised."""
    return status is None or status in (404, 405, 502, 503, 504)


class Handle:
    """What a task's handle is, synchronous or not: its client and its latest record.

    Parameters:
      client: the client that submitted it.
      record: the task's record as the server last gave it.
    """

    def __init__(self, client: Any, record: TaskDict) -> None:
        self.client = client
        self.record = record

    @property
    def id(self) -> str:
        return str(self.record["id"])

    @property
    def state(self) -> str:
        return str(self.record["state"])
