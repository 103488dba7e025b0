"""Refuses clients that fail authentication too often."""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque


class FailureLimiter:
    """Counts authentication failures per client over a sliding window.

    Parameters:
      max_failures: failures allowed within the window; one more and the
        client is refused until the oldest failure leaves the window.
      window_s: the window's length in seconds.
    """

    def __init__(self, max_failures: int = 10, window_s: float = 60.0) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _prune(self, client: str, now: float) -> deque[float]:
        failures = self._failures[client]
        while failures and now - failures[0] > self.window_s:
            failures.popleft()
        return failures

    def retry_after(self, client: str) -> float:
        """Seconds the client must wait, or 0 when it may try."""
        now = time.monotonic()
        with self._lock:
            failures = self._prune(client, now)
            if len(failures) < self.max_failures:
                return 0.0
            return max(0.1, self.window_s - (now - failures[0]))

    def failed(self, client: str) -> None:
        with self._lock:
            self._failures[client].append(time.monotonic())
