"""The API's OpenAPI document, exported the same on every machine.

``python -m pipeline.api.openapi > docs/openapi.json`` writes it: JSON with
sorted keys and a two-space indent, so that the file changes only when the API
does. The server serves the same document at ``/openapi.json``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from pipeline.config import Settings

#: A stand-in server secret: the document is built over a throwaway store, never a real one.
_EXPORT_SECRET = "openapi-export-" + "x" * 40


class DefaultSettings(Settings):
    """The defaults of every setting: no environment, no ``morag.env``, no ``MORAG_CONFIG`` file."""

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource, **others: object
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of the app ``morag-pipeline server`` serves.

    The app is built over a throwaway data directory and Dramatiq's stub
    broker, with the defaults of every setting whatever the environment holds;
    nothing is published and nothing outside that directory is written.
    """
    from pipeline.api.app import create_app
    from pipeline.api.auth import Authenticator
    from pipeline.brokers.stub import build_stub_broker
    from pipeline.security.ratelimit import FailureLimiter
    from pipeline.services import build_services

    with tempfile.TemporaryDirectory(prefix="morag-openapi-") as folder:
        settings = DefaultSettings(data_dir=Path(folder), secret_key=_EXPORT_SECRET)
        services = build_services(settings)
        auth = Authenticator(services.apikeys, services.tokens, FailureLimiter())
        app = create_app(services, build_stub_broker(settings), gpu_workers=lambda: None, auth=auth)
        return app.openapi()


def render(document: dict[str, Any]) -> str:
    """``document`` as the exported file holds it: sorted keys, two-space indent, a final newline."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> int:
    sys.stdout.write(render(openapi_document()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
