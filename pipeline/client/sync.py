"""The synchronous client: ``Client`` talks to the server, ``Task`` is one submitted task."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
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


class Client:
    """Talks to ``morag-pipeline server``.

    Parameters:
      base_url: the server's URL, e.g. http://127.0.0.1:8470; several replicas' URLs,
        comma-separated, are tried in turn: one that cannot be connected to makes way for the
        next (nothing reached it, so even an upload is safe to send again), and the one that
        answered is kept for the next requests.
      api_key: sent as a bearer token when given.
      ca_file: the CA that signed an HTTPS server's certificate (else the system's).
      timeout: seconds to wait for a response (uploads get longer).
      retry: what is sent again, how often, after how long.

    >>> client = Client("http://127.0.0.1:8470", api_key="mpk_...")
    >>> task = client.submit("talk.mp4", language="en")
    >>> task.wait(timeout=600, on_progress=lambda t: print(t["progress"]))
    >>> print(task.result("srt").decode())
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
        self.sleep: Callable[[float], None] = time.sleep
        self.http = httpx.Client(base_url=self.base_url, **self.servers.options)

    @classmethod
    def from_settings(cls, settings: Settings) -> Client:
        """A client of the server ``MORAG_SERVER_URL`` names, with ``MORAG_API_KEY``."""
        key = settings.api_key.get_secret_value() if settings.api_key else None
        return cls(settings.server_url, key, settings.tls_ca_file)

    @property
    def base_url(self) -> str:
        """The URL requests go to now."""
        return self.servers.current

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _send(self, call: Call, rewind: Callable[[], None]) -> httpx.Response:
        """One try at each server in turn until one can be connected to."""
        for turn in range(len(self.servers.urls)):
            try:
                return self.http.request(call.method, call.url, **call.kwargs)
            except httpx.ConnectError as exc:
                error = self.servers.connect_failed(exc, turn)
                if error is not None:
                    raise error from None
                self.http.close()
                self.http = httpx.Client(base_url=self.servers.next(), **self.servers.options)
                rewind()
            except httpx.HTTPError as exc:
                raise policy.failed(self.base_url, exc) from None
        raise AssertionError("unreachable")

    def request(self, method: str, url: str, *, safe: bool | None = None, **kwargs: Any) -> httpx.Response:
        """Send a request, again where ``retry`` allows; ClientError for a refusal or no answer.

        ``safe``: whether the request may be repeated after a timeout (default: GET only).
        """
        return self.send(Call(method, url, kwargs, safe))

    def send(self, call: Call) -> httpx.Response:
        """``request`` of a ``Call``."""
        safe = call.method == "GET" if call.safe is None else call.safe
        rewind = base.rewinder(call.kwargs)
        attempt = 0
        while True:
            try:
                response = self._send(call, rewind)
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
            self.sleep(wait)
            rewind()
            attempt += 1

    _request = request  # the name the CLI's commands used

    # Tasks.
    def submit(self, path_or_url: str | Path, *, idempotency_key: str | None = None, **options: Any) -> Task:
        """Send a file (or a URL) to be processed; the handle of the task it made.

        ``options``: ``priority`` (low, normal, high, urgent), ``gpu`` (prefer, require,
        never), ``model``, ``callback_url`` (POSTed a signed summary when the task ends:
        docs/webhooks.md), and the transcription options ``language`` (a code, or auto),
        ``task`` (translate), ``word_timestamps``, ``vad``, ``prompt``, ``temperature``,
        ``max_words_per_cue`` (docs/transcripts.md). Every try of one call sends the same
        ``Idempotency-Key`` (a fresh one unless given), so a retried upload makes one task.
        """
        return Task(self, self.submit_record(path_or_url, idempotency_key=idempotency_key, **options))

    def submit_record(
        self, path_or_url: str | Path, *, idempotency_key: str | None = None, **options: Any
    ) -> TaskDict:
        """``submit``, returning the task's record as the server answered."""
        with base.submit(path_or_url, idempotency_key, options) as call:
            response = self.send(call)
        return response.json()

    def task(self, task_id: str) -> TaskDict:
        """The task's record: state, route and reasons, progress, outputs, events."""
        return self.send(base.task(task_id)).json()

    def get(self, task_id: str) -> Task:
        """The handle of a task submitted earlier."""
        return Task(self, self.task(task_id))

    def tasks(self, state: str | None = None, limit: int = 50) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        return self.request("GET", "/api/v1/tasks", params=params).json()

    def result(self, task_id: str, fmt: str | None = None) -> bytes:
        """One output of a done task (by default the transcript text or the Markdown)."""
        return self.send(base.result(task_id, fmt)).content

    def cancel(self, task_id: str, reason: str | None = None) -> TaskDict:
        return self.send(base.cancel(task_id, reason)).json()

    def events(
        self, task_ids: list[str] | None = None, last_event_id: str | None = None, timeout: float = STREAM_S
    ) -> Iterator[Event]:
        """The events of ``task_ids`` (from their first; all: the API key's tasks, from now) until
        the server closes the stream; ``last_event_id`` resumes after an event."""
        call = base.events(task_ids, last_event_id, timeout)
        try:
            with self.http.stream(call.method, call.url, **call.kwargs) as r:
                if r.status_code >= 400:
                    r.read()
                    raise policy.refusal(r)
                parser = EventParser()
                for line in r.iter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield event
        except httpx.HTTPError as exc:
            raise self.servers.stream_failed(exc) from None

    def watch(self, records: dict[str, TaskDict], on_update: Progress | None = None) -> Watch:
        """A ``Watch`` of tasks whose first records are ``records`` (by id)."""
        return Watch(self, records, on_update)

    # The fleet.
    def workers(self, states: list[str] | None = None) -> dict[str, Any]:
        """The registry: every worker's record, and how each task queue stands."""
        params = {"state": states} if states else {}
        return self.request("GET", "/api/v1/workers", params=params).json()

    def worker(self, worker_id: str) -> dict[str, Any]:
        return self.request("GET", f"/api/v1/workers/{worker_id}").json()

    def sweep(self) -> dict[str, Any]:
        return self.request("POST", "/api/v1/workers/sweep").json()

    def queues(self, rates: bool = True) -> dict[str, Any]:
        return self.request("GET", "/api/v1/queues", params={"rates": str(rates).lower()}).json()

    def dead(self, queue: str | None = None) -> dict[str, Any]:
        params = {"queue": queue} if queue else {}
        return self.request("GET", "/api/v1/dead", params=params).json()

    def dead_letter(self, letter_id: str, queue: str | None = None) -> dict[str, Any]:
        params = {"queue": queue} if queue else {}
        return self.request("GET", f"/api/v1/dead/{letter_id}", params=params).json()

    def dead_action(self, action: str, queue: str | None, ids: list[str] | None) -> dict[str, Any]:
        """``retry`` or ``purge`` the dead letters of ``queue`` (all if None), only ``ids`` if given."""
        return self.request("POST", f"/api/v1/dead/{action}", json={"queue": queue, "ids": ids}).json()


class Watch:
    """Follows tasks through the event stream, and reads them one by one while it is cut.

    ``run`` follows in the calling thread; ``start`` in a thread of its own, while
    ``get`` hands out the latest records (a read of the server only while the
    stream is down).

    Parameters:
      client: the client.
      records: the first record of each task, by id.
      on_update: called with a task's record each time it changes.
    """

    def __init__(
        self, client: Client, records: dict[str, TaskDict], on_update: Progress | None = None
    ) -> None:
        self.client = client
        self.board = Board(records)
        self.on_update = on_update
        self.streaming = False
        self.cuts = 0
        self.unreachable: ClientError | None = None
        self.changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _take(self, changed: bool, task_id: str) -> None:
        if changed:
            if self.on_update is not None:
                self.on_update(self.board.records[task_id])
            with self.changed:
                self.changed.notify_all()

    def poll(self) -> None:
        """Read every task not ended (the stream is down)."""
        for tid in self.board.pending:
            try:
                record = self.client.task(tid)
            except ClientError as exc:
                if exc.status is not None:
                    raise
                self.unreachable = exc
                return
            self.unreachable = None
            self._take(self.board.replace(record), tid)

    def run(self, timeout: float | None = None) -> dict[str, TaskDict]:
        """Follow until every task ended, ``timeout`` passed or ``stop``; the latest records."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.board.pending and not self._stop.is_set():
            left = STREAM_S if deadline is None else deadline - time.monotonic()
            if left <= 0:
                break
            try:
                self.streaming = True
                for event in self.client.events(
                    self.board.pending, self.board.cursor or None, min(left, STREAM_S)
                ):
                    self.unreachable = None
                    self._take(self.board.apply(event), event.task_id)
                    if not self.board.pending or self._stop.is_set():
                        break
                continue  # the server closed the stream on time: open the next
            except ClientError as exc:
                if not base.stream_ended(exc.status):
                    raise
                self.cuts += 1
            finally:
                self.streaming = False
            self.poll()  # the stream is cut: read, then try the stream again
            pause = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))
            self._stop.wait(pause)
        return self.board.records

    def start(self) -> Watch:
        """Follow in a thread of its own (``stop`` ends it)."""
        self._thread = threading.Thread(target=self._run_quietly, name="morag-watch", daemon=True)
        self._thread.start()
        return self

    def _run_quietly(self) -> None:
        try:
            self.run()
        except ClientError as exc:
            self.unreachable = exc
            self.streaming = False
        finally:
            with self.changed:
                self.changed.notify_all()

    def stop(self) -> None:
        self._stop.set()

    def get(self, task_id: str) -> TaskDict:
        """The latest record of ``task_id``; read from the server while the stream is down."""
        if (self._thread is None or not self._thread.is_alive()) and task_id in self.board.pending:
            self.poll()
        return self.board.records[task_id]

    def wait_change(self, seconds: float) -> None:
        """Sleep up to ``seconds``, less when a record changes."""
        with self.changed:
            self.changed.wait(seconds)


class Task(Handle):
    """One submitted task: its id and latest record, and what can be done with it.

    Parameters:
      client: the client that submitted it.
      record: the task's record as the server last gave it.
    """

    client: Client

    def status(self) -> TaskDict:
        """Read the task's record now."""
        self.record = self.client.task(self.id)
        return self.record

    def wait(
        self, timeout: float | None = None, on_progress: Progress | None = None, *, stream: bool = True
    ) -> TaskDict:
        """Follow the task's events until it ends; its final record.

        ``on_progress`` is called with the record on each change (stage, percent,
        state). Raises ``WaitTimeout`` (with the last record) after ``timeout`` seconds.
        ``stream=False`` reads the task again and again instead (quickly at first,
        then every second), as clients did before the event stream.
        """
        if self.state not in FINAL and stream:
            watch = Watch(self.client, {self.id: self.record}, on_progress)
            self.record = watch.run(timeout)[self.id]
        elif self.state not in FINAL:
            self._poll(timeout, on_progress)
        if self.state not in FINAL:
            raise WaitTimeout(f"task {self.id} is still {self.state} after {timeout:g}s", self.record)
        if self.record.get("events") is None or "outputs" not in self.record:
            self.status()
        return self.record

    def _poll(self, timeout: float | None, on_progress: Progress | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.05
        while self.state not in FINAL and (deadline is None or time.monotonic() < deadline):
            time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))
            before = self.record
            if self.status() != before and on_progress is not None:
                on_progress(self.record)
            pause = min(POLL_S, pause * 1.5)

    def result(self, format: str | None = None) -> bytes:  # noqa: A002 - the API's name
        """One output of the done task: ``txt``, ``srt``, ``vtt``, ``json``, ``md``."""
        return self.client.result(self.id, format)

    def cancel(self, reason: str | None = None) -> TaskDict:
        """Cancel the task; its record (``canceled``)."""
        self.record = self.client.cancel(self.id, reason)
        return self.record
