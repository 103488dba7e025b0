"""The asyncio client: ``AsyncClient`` and ``AsyncTask``, as ``Client`` and ``Task`` with ``await``."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from pipeline.client import policy
from pipeline.client.board import FINAL, Board, TaskDict
from pipeline.client.errors import ClientError, WaitTimeout
from pipeline.client.policy import RetryPolicy
from pipeline.client.sse import Event, EventParser
from pipeline.client.sync import POLL_S, STREAM_S, Progress, _options, upload_form
from pipeline.config import Settings


class AsyncClient:
    """Talks to ``morag-pipeline server`` from asyncio code; the parameters of ``Client``.

    >>> async with AsyncClient("http://127.0.0.1:8470", api_key="mpk_...") as client:
    ...     task = await client.submit("talk.mp4")
    ...     await task.wait(timeout=600)
    ...     print((await task.result("txt")).decode())
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        ca_file: Path | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.base_urls = [url.strip().rstrip("/") for url in base_url.split(",") if url.strip()]
        self._index = 0
        self._options = _options(api_key, ca_file, timeout)
        self.retry = retry or RetryPolicy()
        self.http = httpx.AsyncClient(base_url=self.base_url, **self._options)

    @classmethod
    def from_settings(cls, settings: Settings) -> AsyncClient:
        key = settings.api_key.get_secret_value() if settings.api_key else None
        return cls(settings.server_url, key, settings.tls_ca_file)

    @property
    def base_url(self) -> str:
        return self.base_urls[self._index]

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def _next_server(self) -> None:
        self._index = (self._index + 1) % len(self.base_urls)
        await self.http.aclose()
        self.http = httpx.AsyncClient(base_url=self.base_url, **self._options)

    async def _send(self, method: str, url: str, rewind: Callable[[], None], **kwargs: Any) -> httpx.Response:
        for turn in range(len(self.base_urls)):
            try:
                return await self.http.request(method, url, **kwargs)
            except httpx.ConnectError as exc:
                if policy.is_tls(exc):
                    raise policy.tls_failed(self.base_url, exc) from None
                if turn < len(self.base_urls) - 1:
                    await self._next_server()
                    rewind()
                    continue
                raise policy.unreachable(self.base_urls) from None
            except httpx.HTTPError as exc:
                raise policy.failed(self.base_url, exc) from None
        raise AssertionError("unreachable")

    async def request(
        self, method: str, url: str, *, safe: bool | None = None, **kwargs: Any
    ) -> httpx.Response:
        """``Client.request``, awaited."""
        safe = method == "GET" if safe is None else safe
        files = kwargs.get("files") or {}

        def rewind() -> None:
            for _, upload in files.values():
                upload.seek(0)

        attempt = 0
        while True:
            try:
                response = await self._send(method, url, rewind, **kwargs)
            except ClientError as exc:
                wait = self.retry.after_error(exc, attempt, safe)
                if wait is None:
                    raise
            else:
                if response.status_code < 400:
                    return response
                wait = self.retry.after_answer(response, attempt)
                if wait is None:
                    raise policy.refusal(response)
            await asyncio.sleep(wait)
            rewind()
            attempt += 1

    async def submit(
        self, path_or_url: str | Path, *, idempotency_key: str | None = None, **options: Any
    ) -> AsyncTask:
        """``Client.submit``, awaited."""
        data, path = upload_form(path_or_url, options)
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        timeout = httpx.Timeout(30.0, write=None, read=600.0)
        with ExitStack() as files:
            upload = {"file": (path.name, files.enter_context(path.open("rb")))} if path else None
            response = await self.request(
                "POST", "/api/v1/tasks", safe=True, files=upload, data=data, headers=headers, timeout=timeout
            )
        return AsyncTask(self, response.json())

    async def task(self, task_id: str) -> TaskDict:
        return (await self.request("GET", f"/api/v1/tasks/{task_id}")).json()

    async def get(self, task_id: str) -> AsyncTask:
        return AsyncTask(self, await self.task(task_id))

    async def result(self, task_id: str, fmt: str | None = None) -> bytes:
        params = {"format": fmt} if fmt else {}
        return (await self.request("GET", f"/api/v1/tasks/{task_id}/result", params=params)).content

    async def cancel(self, task_id: str, reason: str | None = None) -> TaskDict:
        body = {"reason": reason} if reason else None
        return (await self.request("POST", f"/api/v1/tasks/{task_id}/cancel", json=body)).json()

    async def events(
        self, task_ids: list[str] | None = None, last_event_id: str | None = None, timeout: float = STREAM_S
    ) -> AsyncIterator[Event]:
        """``Client.events``, as an async iterator."""
        params: dict[str, Any] = {"timeout": f"{timeout:.3f}"}
        if task_ids is not None:
            params["task"] = task_ids
        headers = {
            "Accept": "text/event-stream",
            **({"Last-Event-ID": last_event_id} if last_event_id else {}),
        }
        read = httpx.Timeout(30.0, read=timeout + 30.0)
        try:
            async with self.http.stream(
                "GET", "/api/v1/events", params=params, headers=headers, timeout=read
            ) as r:
                if r.status_code >= 400:
                    await r.aread()
                    raise policy.refusal(r)
                parser = EventParser()
                async for line in r.aiter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield event
        except httpx.ConnectError as exc:
            raise (
                policy.tls_failed(self.base_url, exc)
                if policy.is_tls(exc)
                else policy.unreachable([self.base_url])
            ) from None
        except httpx.HTTPError as exc:
            raise policy.failed(self.base_url, exc) from None

    async def follow(
        self, records: dict[str, TaskDict], timeout: float | None = None, on_update: Progress | None = None
    ) -> dict[str, TaskDict]:
        """Follow tasks through the event stream (reading them while it is cut) until each ended
        or ``timeout`` passed; the latest records."""
        board = Board(records)
        deadline = None if timeout is None else time.monotonic() + timeout

        def take(changed: bool, task_id: str) -> None:
            if changed and on_update is not None:
                on_update(board.records[task_id])

        while board.pending:
            left = STREAM_S if deadline is None else deadline - time.monotonic()
            if left <= 0:
                break
            try:
                async for event in self.events(board.pending, board.cursor or None, min(left, STREAM_S)):
                    take(board.apply(event), event.task_id)
                    if not board.pending:
                        break
                continue
            except ClientError as exc:
                if exc.status is not None and exc.status not in (404, 405, 502, 503, 504):
                    raise
            for tid in board.pending:  # the stream is cut: read, then try it again
                try:
                    take(board.replace(await self.task(tid)), tid)
                except ClientError as exc:
                    if exc.status is not None:
                        raise
            pause = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))
            await asyncio.sleep(pause)
        return board.records


class AsyncTask:
    """``Task`` for asyncio code."""

    def __init__(self, client: AsyncClient, record: TaskDict) -> None:
        self.client = client
        self.record = record

    @property
    def id(self) -> str:
        return str(self.record["id"])

    @property
    def state(self) -> str:
        return str(self.record["state"])

    async def status(self) -> TaskDict:
        self.record = await self.client.task(self.id)
        return self.record

    async def wait(self, timeout: float | None = None, on_progress: Progress | None = None) -> TaskDict:
        """``Task.wait``, awaited."""
        if self.state not in FINAL:
            self.record = (await self.client.follow({self.id: self.record}, timeout, on_progress))[self.id]
        if self.state not in FINAL:
            raise WaitTimeout(f"task {self.id} is still {self.state} after {timeout:g}s", self.record)
        return self.record

    async def result(self, format: str | None = None) -> bytes:  # noqa: A002 - the API's name
        return await self.client.result(self.id, format)

    async def cancel(self, reason: str | None = None) -> TaskDict:
        self.record = await self.client.cancel(self.id, reason)
        return self.record
