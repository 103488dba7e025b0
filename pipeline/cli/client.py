"""The client the CLI's commands use: ``pipeline.client.Client`` (the CLI has no HTTP code of its own)."""

from __future__ import annotations

from pipeline.client import Client, ClientError

#: The name the commands (and their tests) know the client by.
ApiClient = Client

__all__ = ["ApiClient", "ClientError"]
