"""Schemathesis against the API's own OpenAPI spec: whatever is sent, no 5xx and no hang.

An event stream stays open until its ``timeout``: the fuzzer's calls to the streams ask for one
of a fraction of a second, whatever else they send, so that each call ends."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from pipeline.api.app import create_app
from pipeline.api.auth import Authenticator
from pipeline.config import Settings, use_settings
from pipeline.security.ratelimit import FailureLimiter
from pipeline.services import build_services


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, stub_broker):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("fuzz")
    # No worker takes a task here: an OpenAI-compatible call with valid audio answers 504 at once.
    settings = Settings(data_dir=folder, secret_key="s" * 48, max_document_mb=1, openai_wait_s=0.1)
    services = build_services(use_settings(settings))
    key, _ = services.apikeys.create("fuzz", "admin")
    # A generous limiter: the fuzzer's own failures must not turn every answer into 429.
    auth = Authenticator(services.apikeys, services.tokens, FailureLimiter(max_failures=10**6))
    app = create_app(services, stub_broker, gpu_workers=lambda: 1, auth=auth)
    return schemathesis.openapi.from_asgi("/openapi.json", app), key


def operations(api):  # type: ignore[no-untyped-def]
    schema, _ = api
    return [result.ok() for result in schema.get_all_operations()]


def test_every_operation_answers_without_server_errors(api) -> None:  # type: ignore[no-untyped-def]
    schema, key = api
    ops = operations(api)
    assert {op.path for op in ops} >= {"/api/v1/tasks", "/api/v1/tasks/{task_id}", "/healthz"}
    failures: list[str] = []
    calls: dict[str, int] = {}
    for op in ops:

        @given(case=op.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case) -> None:  # type: ignore[no-untyped-def]
            if case.operation.path.endswith("/events"):
                case.query = {**(case.query or {}), "timeout": 0.2}
            for headers in ({"Authorization": f"Bearer {key}"}, {}):
                case.headers = {**(case.headers or {}), **headers}
                response = case.call(timeout=30)
                calls[case.operation.label] = calls.get(case.operation.label, 0) + 1
                waited = response.status_code == 504 and case.operation.path.startswith("/v1/audio/")
                if response.status_code >= 500 and not waited:
                    failures.append(
                        f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:200]}"
                    )

        check()
    assert not failures, "\n".join(failures[:10])
    assert all(calls.get(op.label, 0) >= 1 for op in ops), calls
    assert calls["POST /api/v1/tasks"] >= 20, calls
