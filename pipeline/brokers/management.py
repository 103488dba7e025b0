"""Reading RabbitMQ's management HTTP API for the server's vhost: queues, exchanges, bindings, policies.

Its credentials are those of MORAG_BROKER_URL; its address is
MORAG_BROKER_MANAGEMENT_URL. Every call raises httpx.HTTPError when the API
cannot be asked.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

import httpx

from pipeline.config import Settings

#: The message rates ``rates`` reports, by the name RabbitMQ gives them in ``message_stats``.
RATES = {"publish": "publish_details", "deliver": "deliver_get_details", "ack": "ack_details"}


class Management:
    """A client of the management API, for the vhost of MORAG_BROKER_URL.

    Parameters:
      settings: where the broker and its management API are.
      timeout: seconds to wait for each answer.
    """

    def __init__(self, settings: Settings, timeout: float = 5.0) -> None:
        amqp = urllib.parse.urlsplit(settings.broker_url.get_secret_value())
        auth = (
            urllib.parse.unquote(amqp.username or "guest"),
            urllib.parse.unquote(amqp.password or "guest"),
        )
        self.vhost = urllib.parse.unquote(amqp.path.lstrip("/")) or "/"
        self._quoted = urllib.parse.quote(self.vhost, safe="")
        self.http = httpx.Client(base_url=settings.broker_management_url, auth=auth, timeout=timeout)

    def __enter__(self) -> Management:
        return self

    def __exit__(self, *_: object) -> None:
        self.http.close()

    def _get(self, path: str, **params: str) -> Any:
        response = self.http.get(path, params=params)
        response.raise_for_status()
        return response.json()

    def overview(self) -> dict[str, Any]:
        return self._get("/api/overview")

    def queues(self, columns: str | None = None) -> list[dict[str, Any]]:
        """Every queue of the vhost with its arguments, policy and statistics (only ``columns``,
        comma-separated, when given)."""
        params = {"columns": columns} if columns else {}
        return self._get(f"/api/queues/{self._quoted}", **params)

    def exchange(self, name: str) -> dict[str, Any] | None:
        """The exchange, or None when the vhost has none of that name."""
        response = self.http.get(f"/api/exchanges/{self._quoted}/{urllib.parse.quote(name, safe='')}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()

    def bindings(self, exchange: str) -> list[dict[str, Any]]:
        """Bindings whose source is ``exchange``."""
        name = urllib.parse.quote(exchange, safe="")
        return self._get(f"/api/exchanges/{self._quoted}/{name}/bindings/source")

    def policies(self) -> list[dict[str, Any]]:
        return self._get(f"/api/policies/{self._quoted}")

    def rates(self, names: list[str]) -> dict[str, dict[str, float | None]]:
        """Messages per second published to, delivered from and acknowledged on each of ``names``."""
        found: dict[str, dict[str, float | None]] = {}
        by_name = {q.get("name"): q for q in self.queues()}
        for name in names:
            stats = (by_name.get(name) or {}).get("message_stats") or {}
            found[name] = {rate: (stats.get(key) or {}).get("rate") for rate, key in RATES.items()}
        return found
