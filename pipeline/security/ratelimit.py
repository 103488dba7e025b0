"""Refuses clients that fail authentication too often."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable

#: The most clients a limiter remembers; past it the one whose last failure is oldest is forgotten.
MAX_CLIENTS = 10_000


class FailureLimiter:
    """Counts authentication failures per client over a sliding window.

    A client is any hashable key: an address, or an (address, key id) pair.
    Failures older than the window are dropped, a client with none left is
    forgotten, and at most ``max_clients`` clients are remembered: a flood of
    new ones makes the limiter forget the longest quiet, never grow.

    Parameters:
      max_failures: failures allowed within the window; one more and the
        client is refused until the oldest failure leaves the window.
      window_s: the window's length in seconds.
      max_clients: the most clients remembered at once.
      clock: the time source (seconds, monotonic).
    """

    def __init__(
        self,
        max_failures: int = 10,
        window_s: float = 60.0,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_clients = max_clients
        self._clock = clock
        # Least recently failed first.
        self._failures: OrderedDict[Hashable, deque[float]] = OrderedDict()
        self._lock = threading.Lock()
        self._swept = self._clock()

    def remembered(self) -> int:
        """How many clients are remembered."""
        with self._lock:
            return len(self._failures)

    def _recent(self, client: Hashable, now: float) -> deque[float] | None:
        failures = self._failures.get(client)
        if failures is None:
            return None
        while failures and now - failures[0] > self.window_s:
            failures.popleft()
        if not failures:
            del self._failures[client]
            return None
        return failures

    def _sweep(self, now: float) -> None:
        """Forget every client whose failures all left the window (at most once per window)."""
        if now - self._swept < self.window_s:
            return
        self._swept = now
        # Least recently failed first: stop at the first client with a recent failure.
        for client in list(self._failures):
            if self._recent(client, now) is not None:
                break

    def retry_after(self, client: Hashable) -> float:
        """Seconds the client must wait, or 0 when it may try."""
        now = self._clock()
        with self._lock:
            self._sweep(now)
            failures = self._recent(client, now)
            if failures is None or len(failures) < self.max_failures:
                return 0.0
            return max(0.1, self.window_s - (now - failures[0]))

    def failed(self, client: Hashable) -> None:
        """Count one failure of ``client``."""
        now = self._clock()
        with self._lock:
            self._sweep(now)
            failures = self._recent(client, now)
            if failures is None:
                while len(self._failures) >= self.max_clients:
                    self._failures.popitem(last=False)
                failures = self._failures[client] = deque(maxlen=self.max_failures)
            else:
                self._failures.move_to_end(client)
            failures.append(now)
