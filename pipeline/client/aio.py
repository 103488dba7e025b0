"""The asyncio client: ``AsyncClient`` and ``AsyncTask``, as ``Client`` and ``Task`` with ``await``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from pipeline.client import base, policy
from pipeline.client.base import POLL_S, STREAM_S, Call, Handle, Progress, Servers
from pipeline.client.board import FINAL, Board, TaskDict
from pipeline.client.errors import ClientError, WaitTimeout
from pipeline.client.policy import RetryPolicy
from pipeline.client.sse import Event, EventParser
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
        self.servers = Servers(base_url, api_key, ca_file, timeout)
        self.retry = retry or RetryPolicy()
        self.http = httpx.AsyncClient(base_url=self.base_url, **self.servers.options)

    @classmethod
    def from_settings(cls, settings: Settings) -> AsyncClient:
        key = settings.api_key.get_secret_value() if settings.api_key else None
        return cls(settings.server_url, key, settings.tls_ca_file)

    @property
    def base_url(self) -> str:
        return self.servers.current

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def _send(self, call: Call, rewind: Callable[[], None]) -> httpx.Response:
        for turn in range(len(self.servers.urls)):
            try:
                return await self.http.request(call.method, call.url, **call.kwargs)
            except httpx.ConnectError as exc:
                error = self.servers.connect_failed(exc, turn)
                if error is not None:
                    raise error from None
                await self.http.aclose()
                self.http = httpx.AsyncClient(base_url=self.servers.next(), **self.servers.options)
                rewind()
            except httpx.HTTPError as exc:
                raise policy.failed(self.base_url, exc) from None
        raise AssertionError("unreachable")

    async def request(
        self, method: str, url: str, *, safe: bool | None = None, **kwargs: Any
    ) -> httpx.Response:
        """``Client.request``, awaited."""
        return await self.send(Call(method, url, kwargs, safe))

    async def send(self, call: Call) -> httpx.Response:
        """``Client.send``, awaited."""
        safe = call.method == "GET" if call.safe is None else call.safe
        rewind = base.rewinder(call.kwargs)
        attempt = 0
        while True:
            try:
                response = await self._send(call, rewind)
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
        with base.submit(path_or_url, idempotency_key, options) as call:
            response = await self.send(call)
        return AsyncTask(self, response.json())

    async def task(self, task_id: str) -> TaskDict:
        return (await self.send(base.task(task_id))).json()

    async def get(self, task_id: str) -> AsyncTask:
        return AsyncTask(self, await self.task(task_id))

    async def result(self, task_id: str, fmt: str | None = None) -> bytes:
        return (await self.send(base.result(task_id, fmt))).content

    async def cancel(self, task_id: str, reason: str | None = None) -> TaskDict:
        return (await self.send(base.cancel(task_id, reason))).json()

    async def events(
        self, task_ids: list[str] | None = None, last_event_id: str | None = None, timeout: float = STREAM_S
    ) -> AsyncIterator[Event]:
        """``Client.events``, as an async iterator."""
        call = base.events(task_ids, last_event_id, timeout)
        try:
            async with self.http.stream(call.method, call.url, **call.kwargs) as r:
                if r.status_code >= 400:
                    await r.aread()
                    raise policy.refusal(r)
                parser = EventParser()
                async for line in r.aiter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield event
        except httpx.HTTPError as exc:
            raise self.servers.stream_failed(exc) from None

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
                if not base.stream_ended(exc.status):
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


class AsyncTask(Handle):
    """``Task`` for asyncio code."""

    client: AsyncClient

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
