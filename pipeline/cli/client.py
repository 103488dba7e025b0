"""A small client of the server's HTTP API, with errors a user can read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from pipeline.errors import PipelineError


class ClientError(PipelineError):
    """The server refused a request or could not be reached."""


class ApiClient:
    """Talks to ``morag-pipeline server``.

    Parameters:
      base_url: the server's URL, e.g. http://127.0.0.1:8470.
      timeout: seconds to wait for a response (uploads get longer).
    """

    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout)

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, url, **kwargs)
        except httpx.ConnectError:
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
            raise ClientError(str(detail).strip() or f"HTTP {response.status_code}")
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

    def result(self, task_id: str, fmt: str | None = None) -> bytes:
        params = {"format": fmt} if fmt else {}
        return self._request("GET", f"/api/v1/tasks/{task_id}/result", params=params).content
