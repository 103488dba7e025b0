"""A small client of the server's HTTP API, with errors a user can read."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import httpx

from pipeline.config import Settings
from pipeline.errors import PipelineError


class ClientError(PipelineError):
    """The server refused a request or could not be reached.

    Parameters:
      message: one line for the user.
      status: the HTTP status of the refusal; None when no answer came (unreachable, TLS, timeout).
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def about_the_request(self) -> bool:
        """The server answered and refused this request for what it carried (4xx other than
        401/403, or a 5xx for this one request): the next request may well succeed."""
        return self.status is not None and self.status not in (401, 403)


class ApiClient:
    """Talks to ``morag-pipeline server``.

    Parameters:
      base_url: the server's URL, e.g. http://127.0.0.1:8470.
      api_key: sent as a bearer token when given.
      ca_file: the CA that signed an HTTPS server's certificate (else the system's).
      timeout: seconds to wait for a response (uploads get longer).
    """

    def __init__(
        self, base_url: str, api_key: str | None = None, ca_file: Path | None = None, timeout: float = 30.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers, verify=verify)

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiClient:
        key = settings.api_key.get_secret_value() if settings.api_key else None
        return cls(settings.server_url, key, settings.tls_ca_file)

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, url, **kwargs)
        except httpx.ConnectError as exc:
            if "ssl" in str(exc).lower() or "certificate" in str(exc).lower():
                raise ClientError(
                    f"TLS failed with {self.base_url}: {exc} (MORAG_TLS_CA_FILE names the CA to trust)"
                ) from None
            raise ClientError(
                f"cannot reach the server at {self.base_url} (is `morag-pipeline server` running?"
                " MORAG_SERVER_URL sets where to look)"
            ) from None
        except httpx.TimeoutException:
            raise ClientError(f"the server at {self.base_url} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise ClientError(f"request to {self.base_url} failed: {exc}") from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            if isinstance(detail, list):  # FastAPI validation errors
                detail = "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in detail)
            raise ClientError(str(detail).strip() or f"HTTP {response.status_code}", response.status_code)
        return response

    def submit(self, path: Path, **form: str | None) -> dict[str, Any]:
        data = {k: v for k, v in form.items() if v is not None}
        with path.open("rb") as f:
            response = self._request(
                "POST",
                "/api/v1/tasks",
                files={"file": (path.name, f)},
                data=data,
                timeout=httpx.Timeout(30.0, write=None, read=600.0),
            )
        return response.json()

    def task(self, task_id: str) -> dict[str, Any]:
        return self._request("GET", f"/api/v1/tasks/{task_id}").json()

    def tasks(self, state: str | None = None, limit: int = 50) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        return self._request("GET", "/api/v1/tasks", params=params).json()

    def workers(self, states: list[str] | None = None) -> dict[str, Any]:
        """The registry: every worker's record, and how each task queue stands."""
        params = {"state": states} if states else {}
        return self._request("GET", "/api/v1/workers", params=params).json()

    def result(self, task_id: str, fmt: str | None = None) -> bytes:
        params = {"format": fmt} if fmt else {}
        return self._request("GET", f"/api/v1/tasks/{task_id}/result", params=params).content

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self._request("POST", f"/api/v1/tasks/{task_id}/cancel").json()

    def dead(self, queue: str | None = None) -> dict[str, Any]:
        params = {"queue": queue} if queue else {}
        return self._request("GET", "/api/v1/dead", params=params).json()

    def dead_letter(self, letter_id: str, queue: str | None = None) -> dict[str, Any]:
        params = {"queue": queue} if queue else {}
        return self._request("GET", f"/api/v1/dead/{letter_id}", params=params).json()

    def dead_action(self, action: str, queue: str | None, ids: list[str] | None) -> dict[str, Any]:
        """``retry`` or ``purge`` the dead letters of ``queue`` (all if None), only ``ids`` if given."""
        return self._request("POST", f"/api/v1/dead/{action}", json={"queue": queue, "ids": ids}).json()
