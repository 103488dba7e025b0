"""What the client raises: one line a user can read, and whether the server answered."""

from __future__ import annotations

from typing import Any

from pipeline.errors import PipelineError


class ClientError(PipelineError):
    """The server refused a request or could not be reached.

    Parameters:
      message: one line for the user.
      status: the HTTP status of the refusal; None when no answer came (unreachable, TLS, timeout).
      retryable: whether sending the same request again may succeed (nothing reached the server).
    """

    def __init__(self, message: str, status: int | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable

    @property
    def about_the_request(self) -> bool:
        """The server answered and refused this request for what it carried (4xx other than
        401/403, or a 5xx for this one request): the next request may well succeed."""
        return self.status is not None and self.status not in (401, 403)


class WaitTimeout(ClientError, TimeoutError):
    """``wait()`` ran out of time before the task ended; ``task`` is its last known record."""

    def __init__(self, message: str, task: dict[str, Any]) -> None:
        super().__init__(message)
        self.task = task
