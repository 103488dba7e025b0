"""The OpenAI-compatible endpoints and the transcription options of ``POST /api/v1/tasks`` in-process,
over Dramatiq's stub broker: what is refused, and how (the fleet path is tests/integration/test_openai.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pipeline.config import Settings, use_settings
from pipeline.services import Services, build_services
from tests.conftest import TEST_SECRET, in_process_api


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, stub_broker) -> Iterator[tuple[TestClient, Services]]:
    """No worker consumes the stub broker: a task stays queued, and an OpenAI request times out."""
    settings = use_settings(
        Settings(
            data_dir=tmp_path_factory.mktemp("data"),
            secret_key=TEST_SECRET,
            file_access="shared",
            openai_wait_s=1.0,
            whisper_allowed_models=["tiny.en", "small"],
        )
    )
    services = build_services(settings)
    with in_process_api(services, stub_broker) as client:
        yield client, services
    stub_broker.flush_all()


def post(client: TestClient, url: str, path: Path, **form: object):
    with path.open("rb") as f:
        return client.post(url, files={"file": (path.name, f)}, data=form)


def nothing_kept(services: Services) -> bool:
    """No task recorded and no uploaded file left behind."""
    uploads = services.settings.data_dir / "uploads"
    tasks = services.files.root / "tasks"
    return (
        sum(services.store.counts().values()) == 0 and not any(uploads.iterdir()) and not any(tasks.iterdir())
    )


def test_task_options_are_checked_and_carried(api, samples: Path) -> None:
    client, services = api
    refused = post(client, "/api/v1/tasks", samples / "speech.mp3", language="klingon")
    assert refused.status_code == 400
    assert (
        refused.json()["detail"]
        == "unknown language 'klingon': give auto or a Whisper language code; e.g. en, de, fr, es, zh"
    )
    english = post(client, "/api/v1/tasks", samples / "speech.mp3", task="translate")
    assert (
        english.status_code == 400
        and "model tiny.en is English-only: it cannot translate" in english.json()["detail"]
    )
    assert nothing_kept(services)
    made = post(client, "/api/v1/tasks", samples / "speech.mp3", language="auto", word_timestamps="true",
                vad="false", max_words_per_cue="4", prompt="Glossary: MoRAG.")  # fmt: skip
    assert made.status_code == 201, made.text
    assert made.json()["options"] == {"priority": "normal", "gpu": "prefer", "language": "auto",
                                      "word_timestamps": True, "prompt": "Glossary: MoRAG.",
                                      "max_words_per_cue": 4}  # fmt: skip


def test_models_are_the_allowed_ones(api) -> None:
    client, _ = api
    listed = client.get("/v1/models").json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == ["tiny.en", "small"]


@pytest.mark.parametrize(
    ("form", "status", "param", "code", "message"),
    [
        (
            {"model": "whisper-9"},
            404,
            "model",
            "model_not_found",
            "the model 'whisper-9' does not exist here",
        ),
        (
            {"response_format": "xml"},
            400,
            "response_format",
            None,
            "response_format must be one of json, text",
        ),
        (
            {"timestamp_granularities[]": "letter"},
            400,
            "timestamp_granularities[]",
            None,
            "must be word or segment",
        ),
        ({"language": "xx"}, 400, "language", None, "unknown language 'xx'"),
        ({"temperature": "2"}, 400, "temperature", None, "temperature must be between 0 and 1, not 2"),
    ],
)
def test_openai_errors_have_openais_shape(api, samples: Path, form, status, param, code, message) -> None:
    client, services = api
    before = services.store.counts()
    answer = post(client, "/v1/audio/transcriptions", samples / "speech.mp3", **form)
    assert answer.status_code == status
    error = answer.json()["error"]
    assert message in error["message"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert services.store.counts() == before  # no task made


def test_a_document_is_refused_not_converted(api, samples: Path) -> None:
    client, services = api
    before = services.store.counts()
    answer = post(client, "/v1/audio/transcriptions", samples / "report.html")
    assert answer.status_code == 415
    error = answer.json()["error"]
    assert (error["param"], error["code"]) == ("file", "unsupported_file")
    assert (
        error["message"]
        == "report.html: html content makes a convert task; only transcribe tasks are taken here"
    )
    assert services.store.counts() == before


def test_translation_needs_a_multilingual_model(api, samples: Path) -> None:
    client, _ = api
    answer = post(client, "/v1/audio/translations", samples / "speech.mp3", model="whisper-1")
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "model"
    assert "model tiny.en is English-only: it cannot translate" in answer.json()["error"]["message"]


def test_a_task_that_does_not_end_in_time_is_a_504_with_its_id(api, samples: Path) -> None:
    client, services = api
    answer = post(client, "/v1/audio/transcriptions", samples / "speech.mp3", model="tiny.en")
    assert answer.status_code == 504
    task_id = answer.headers["x-task-id"]
    error = answer.json()["error"]
    assert (error["type"], error["code"]) == ("timeout", "task_pending")
    assert f"task {task_id} has not ended after 1 s (MORAG_OPENAI_WAIT_S); it goes on" in error["message"]
    assert services.store.get(task_id).state == "queued"  # it goes on


def test_a_bad_key_and_an_unknown_path_keep_their_shapes(api) -> None:
    client, _ = api
    answer = client.get("/v1/models", headers={"Authorization": "Bearer mpk_000000000000_nope"})
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/api/v1/tasks/nope").json() == {"detail": "no task nope"}  # FastAPI's shape elsewhere
