"""The API's own docs pages, /docs (Swagger UI) and /redoc, in headless Chromium on a closed network:
every request to a host other than the server is aborted, and both pages still draw the API's
operations from the files the server ships (a screenshot of each, in the test's ``screenshots``).

ReDoc asks one thing of the outside: its maker's logo in the side menu, an image that hides
itself when it cannot load. Nothing else is asked."""

from __future__ import annotations

import urllib.parse
from typing import Any

import pytest

from tests.conftest import Stack
from tests.dashboard.conftest import Screens

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

#: The one outside request of ReDoc's page: a logo that hides itself when it cannot load.
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


def closed_network(page: Any, server: str) -> list[str]:
    """Abort every request of ``page`` that is not for ``server`` (host:port); returns the list of
    the aborted URLs, filled as the page runs."""
    aborted: list[str] = []

    def route(request_route: Any) -> None:
        url = request_route.request.url
        if urllib.parse.urlsplit(url).netloc == server:
            request_route.continue_()
        else:
            aborted.append(url)
            request_route.abort()

    page.route("**/*", route)
    return aborted


def test_docs_and_redoc_render_the_operations_with_nothing_from_outside(
    stack: Stack, chromium: Any, screens: Screens
) -> None:
    stack.start_server()
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    aborted = closed_network(page, urllib.parse.urlsplit(stack.url).netloc)

    page.goto(f"{stack.url}/docs")
    submit = page.locator('.opblock-post .opblock-summary-path[data-path="/api/v1/tasks"]')
    submit.wait_for(timeout=30_000)
    assert page.locator(".opblock").count() >= 10  # every operation of the API, not a blank page
    assert "morag-pipeline" in page.locator(".info .title").inner_text()
    screens.shoot(page, "swagger-ui")
    assert aborted == []  # Swagger UI asked nothing of any other host

    page.goto(f"{stack.url}/redoc")
    page.locator("[data-section-id^='tag/tasks/operation/']").first.wait_for(timeout=30_000)
    assert page.locator("h1").first.inner_text().startswith("morag-pipeline")
    screens.shoot(page, "redoc")
    assert set(aborted) <= {REDOC_LOGO}
    context.close()
