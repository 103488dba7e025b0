"""The server's webhook sender: a thread that claims due deliveries and POSTs them, signed.

It looks for due deliveries every ``MORAG_WEBHOOK_POLL_S`` seconds, and at once
when a task ends in this process (``deliveries.DUE``); a task that ended in the
sweep's process or on another replica is found by the next look. Each try is
claimed first (``DeliveryStore.claim``), so with several replicas one sends it.

A try is one POST, checked like any outbound request (``pipeline.netsafety``:
private addresses refused unless ``MORAG_FETCH_ALLOW_PRIVATE``), never
following a redirect. A 2xx answer delivers it; any other answer, a
connection error or a refused address is tried again after
``MORAG_WEBHOOK_BACKOFF_S``, doubling up to ``MORAG_WEBHOOK_BACKOFF_MAX_S``,
until ``MORAG_WEBHOOK_MAX_AGE_S`` after the task ended: then it is given up.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from pipeline import __version__
from pipeline.config import Settings
from pipeline.errors import TaskNotFound
from pipeline.logs import get_logger
from pipeline.netsafety import UnsafeURL, check_url, safe_client
from pipeline.security.webhook_secrets import WebhookSecrets
from pipeline.store import FINAL_STATES, TaskStore
from pipeline.webhooks.deliveries import DUE, Delivery, DeliveryStore, WebhookState, shown_url
from pipeline.webhooks.payload import summary
from pipeline.webhooks.signing import SIGNATURE_HEADER, sign

logger = get_logger(__name__)

#: Deliveries sent at once (a slow receiver holds up only its own).
SENDERS = 4
#: Seconds a claim outlives a try's timeout: the claim of a server that died runs out after it.
CLAIM_MARGIN_S = 30.0


def check_target(url: str, settings: Settings, *, resolve: bool = True) -> None:
    """Refuse a callback URL the server may not send to (``UnsafeURL`` says why).

    Without ``resolve``, its form only (http or https, a host, a numeric port): no name is looked up.
    """
    check_url(
        url,
        allow_private=settings.fetch_allow_private or not resolve,
        allow_hosts=tuple(settings.fetch_allow_hosts),
    )


def backoff(attempts: int, settings: Settings) -> float:
    """Seconds before the try after ``attempts`` failed ones."""
    return min(settings.webhook_backoff_max_s, settings.webhook_backoff_s * 2 ** max(0, attempts - 1))


class Courier:
    """Sends the webhooks of ended tasks, from a thread of the server.

    Parameters:
      settings: the server's settings (``webhook_*``, ``fetch_allow_*``).
      deliveries: where deliveries are kept and claimed.
      tasks: the task store (what a webhook says of its task).
      secrets: the webhook secrets that sign them.
      name: this server in its claims (default: host and process id).
    """

    def __init__(
        self,
        settings: Settings,
        deliveries: DeliveryStore,
        tasks: TaskStore,
        secrets: WebhookSecrets,
        name: str | None = None,
    ) -> None:
        self.settings = settings
        self.deliveries = deliveries
        self.tasks = tasks
        self.secrets = secrets
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.lease_s = settings.webhook_timeout_s + CLAIM_MARGIN_S
        self.http = safe_client(
            allow_private=settings.fetch_allow_private,
            allow_hosts=tuple(settings.fetch_allow_hosts),
            timeout_s=settings.webhook_timeout_s,
            max_redirects=0,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(SENDERS, thread_name_prefix="morag-webhook")

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Courier:
        self._thread = threading.Thread(target=self.run, name="morag-webhooks", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop looking; a try under way finishes (or is claimed again once its claim runs out)."""
        self._stop.set()
        DUE.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                sent = self.tick()
            except Exception:
                logger.exception("webhook deliveries could not be read; trying again")
                sent = 0
            if not sent:
                self._pause()

    def _pause(self) -> None:
        """Sleep until the next delivery is due, a task ends here, or the next look."""
        wait = self.settings.webhook_poll_s
        try:
            due = self.deliveries.next_due()
        except Exception:
            due = None
        if due is not None:
            wait = max(0.0, min(wait, due - time.time()))
        if DUE.wait(wait):
            DUE.clear()

    def tick(self) -> int:
        """Claim and send the deliveries due now; how many were claimed."""
        claimed = self.deliveries.claim(self.name, time.time(), self.lease_s, SENDERS)
        list(self._pool.map(self.deliver, claimed))
        return len(claimed)

    def deliver(self, delivery: Delivery) -> WebhookState | None:
        """One try of a claimed delivery; the state it left (None: it was no longer ours)."""
        try:
            task = self.tasks.get(delivery.task_id, events=False)
        except TaskNotFound:
            task = None
        if task is None or task.state not in FINAL_STATES:
            self.deliveries.release(delivery, self.name)  # requeued meanwhile: its next end is sent
            return None
        body = json.dumps(summary(task, delivery.id, self.settings), separators=(",", ":")).encode()
        attempt = delivery.attempts + 1
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"morag-pipeline/{__version__} webhooks",
            "Morag-Event": f"task.{task.state.value}",
            "Morag-Delivery": delivery.id,
            "Morag-Attempt": str(attempt),
            SIGNATURE_HEADER: sign(self.secrets.secret_of(delivery.key_id), body),
        }
        status, error = self._post(delivery.url, body, headers)
        now = time.time()
        next_at = None
        if error is not None:
            next_at = now + backoff(attempt, self.settings)
            if next_at > (delivery.due_since or now) + self.settings.webhook_max_age_s:
                next_at = None
        state = self.deliveries.finish(
            delivery, self.name, now, status=status, error=error, next_attempt_at=next_at
        )
        fields = {"task_id": task.id, "url": shown_url(delivery.url), "attempt": attempt, "status": status}
        if state is WebhookState.delivered:
            logger.info("webhook delivered", extra=fields)
        elif state is not None:
            logger.warning(
                "webhook not delivered",
                extra={**fields, "error": error, "state": state.value, "next": next_at},
            )
        return state

    def _post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int | None, str | None]:
        """Send one try; the answer's status, and why it failed (None: a 2xx answer)."""
        try:
            with self.http.stream(
                "POST", url, content=body, headers=headers, follow_redirects=False
            ) as answer:
                status = answer.status_code
        except UnsafeURL as exc:
            return None, str(exc)
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
            return None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if 200 <= status < 300:
            return status, None
        return status, f"HTTP {status} {httpx.codes.get_reason_phrase(status)}".strip()
