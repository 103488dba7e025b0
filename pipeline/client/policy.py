"""What to do with each answer, free of I/O: which requests are retried, after how long, and the
one-line errors the sync and asyncio clients both raise."""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass

import httpx

from pipeline.client.errors import ClientError


@dataclass(frozen=True)
class RetryPolicy:
    """When a request is sent again.

    Connection errors (nothing reached any server), 503 and 429 or 409 with a
    ``Retry-After`` are retried; a timeout or a cut answer only for requests
    that are safe to repeat (reads, and submits with an ``Idempotency-Key``).

    Parameters:
      retries: how many times one request is sent again at most.
      backoff_s: the first wait; each next one doubles, up to ``max_wait_s``.
      max_wait_s: the longest wait; a ``Retry-After`` longer than it is not waited for.
    """

    retries: int = 3
    backoff_s: float = 0.5
    max_wait_s: float = 30.0

    def backoff(self, attempt: int) -> float:
        return min(self.max_wait_s, self.backoff_s * 2**attempt)

    def after_answer(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before sending again after ``response``; None: do not."""
        if attempt >= self.retries:
            return None
        told = retry_after(response.headers.get("retry-after"))
        if response.status_code == 503:
            wait = self.backoff(attempt) if told is None else told
        elif response.status_code in (429, 409) and told is not None:
            wait = told
        else:
            return None
        return wait if wait <= self.max_wait_s else None

    def after_error(self, error: ClientError, attempt: int, safe: bool) -> float | None:
        """Seconds to wait before sending again after ``error``; None: do not."""
        if attempt >= self.retries or not (
            error.retryable or (safe and error.status is None and _cut(error))
        ):
            return None
        return self.backoff(attempt)


def _cut(error: ClientError) -> bool:
    return isinstance(error.__cause__, httpx.TimeoutException | httpx.RemoteProtocolError | httpx.ReadError)


def retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (a number or an HTTP date); None when absent or bad."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def refusal(response: httpx.Response) -> ClientError:
    """The error of a 4xx or 5xx answer, with the server's ``detail``."""
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    if isinstance(detail, list):  # FastAPI validation errors
        detail = "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in detail)
    return ClientError(str(detail).strip() or f"HTTP {response.status_code}", response.status_code)


def is_tls(exc: httpx.ConnectError) -> bool:
    return "ssl" in str(exc).lower() or "certificate" in str(exc).lower()


def tls_failed(url: str, exc: Exception) -> ClientError:
    return ClientError(f"TLS failed with {url}: {exc} (MORAG_TLS_CA_FILE names the CA to trust)")


def unreachable(urls: list[str]) -> ClientError:
    where = ", ".join(urls)
    return ClientError(
        f"cannot reach the server at {where} (is `morag-pipeline server` running?"
        " MORAG_SERVER_URL sets where to look)",
        retryable=True,
    )


def failed(url: str, exc: httpx.HTTPError) -> ClientError:
    """The error of a request that got no usable answer (timeout, cut connection)."""
    if isinstance(exc, httpx.TimeoutException):
        error = ClientError(f"the server at {url} did not answer in time")
    else:
        error = ClientError(f"request to {url} failed: {exc}")
    error.__cause__ = exc
    return error
