"""Bad input, table-driven: each case gets a clear, specific error, and nothing is lost or corrupted.

Uploads and API requests run in-process (stub broker); messages published
straight to the queues run against the real RabbitMQ; transfer-path cases are
in tests/transfer/test_grants.py and tests/transfer/.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import dramatiq
import jwt
import pika
import pytest
from fastapi.testclient import TestClient

from pipeline.api.app import create_app
from pipeline.api.auth import Authenticator
from pipeline.config import Settings, use_settings
from pipeline.security.ratelimit import FailureLimiter
from pipeline.security.tokens import AuthError
from pipeline.services import Services, build_services
from tests.conftest import SAMPLES, Stack, make_pdf, make_silent_video, queue_depth

SECRET = "b" * 48
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory, stub_broker) -> Services:  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("bad-input")
    settings = Settings(data_dir=folder, secret_key=SECRET, max_upload_mb=2, max_document_mb=1)
    return build_services(use_settings(settings))


@pytest.fixture(scope="module")
def client(services: Services, stub_broker) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    auth = Authenticator(services.apikeys, services.tokens, FailureLimiter(max_failures=10**6))
    key, _ = services.apikeys.create("tests", "admin")
    with TestClient(create_app(services, stub_broker, gpu_workers=lambda: 1, auth=auth)) as c:
        c.headers["Authorization"] = f"Bearer {key}"
        yield c


def silent_video(folder: Path) -> bytes:
    return make_silent_video(folder / "silent.mp4").read_bytes()


def damaged_zip() -> bytes:
    return b"PK\x03\x04" + b"\x00" * 200


def plain_zip(folder: Path) -> bytes:
    import zipfile

    path = folder / "x.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a.txt", "hello")
    return path.read_bytes()


# (case, filename, content or a callable of a folder, HTTP status, a fragment of the error)
UPLOADS = [
    ("zero-byte media", "empty.mp3", b"", 400, "the file is empty"),
    ("truncated mp3", "cut.mp3", b"ID3\x03\x00\x00\x00" + b"\xff" * 64, 400, "corrupt or truncated media"),
    ("text named .mp4", "holiday.mp4", b"not a video at all\n", 415, "plain text, but the name says .mp4"),
    ("text named .pdf", "report.pdf", b"plain words\n", 415, "plain text, but the name says .pdf"),
    ("random binary", "blob.bin", bytes(range(256)) * 40, 415, "unsupported content"),
    ("zip that is not office", "photos.docx", plain_zip, 415, "a ZIP archive, not a DOCX, PPTX or XLSX"),
    ("damaged office zip", "budget.docx", damaged_zip(), 400, "damaged ZIP container"),
    ("damaged pdf", "broken.pdf", b"%PDF-1.7\n%%garbage\n", 400, "the PDF is damaged"),
    ("video without audio", "silent.mp4", silent_video, 400, "no audio track to transcribe"),
    ("document over its limit", "big.md", b"#" * (MIB + 1), 413, "1 MiB allowed for documents"),
    ("media over its limit", "big.mp3", b"ID3\x03\x00" + b"\xff" * (2 * MIB), 413,
     "2 MiB allowed for audio and video"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "name", "content", "status", "error"), UPLOADS, ids=[c[0] for c in UPLOADS])
def test_bad_uploads(
    client: TestClient,
    services: Services,
    tmp_path: Path,
    case: str,
    name: str,
    content,
    status: int,
    error: str,
) -> None:  # type: ignore[no-untyped-def]
    body = content(tmp_path) if callable(content) else content
    before = services.store.counts()
    response = client.post("/api/v1/tasks", files={"file": (name, body)})
    assert response.status_code == status, response.text
    assert error in response.json()["detail"]
    assert services.store.counts() == before  # no task recorded
    assert list((services.settings.data_dir / "uploads").iterdir()) == []  # nothing left behind


REQUESTS = [
    ("not multipart", {"content": b'{"file": "x"}', "headers": {"content-type": "application/json"}}, 415,
     "send the file as multipart/form-data"),
    ("no file part", {"data": {"priority": "high"}, "files": {"other": ("a.md", b"# a")}}, 400,
     "no 'file' part in the upload"),
    ("two files", {"files": [("file", ("a.md", b"# a")), ("file", ("b.md", b"# b"))]}, 400,
     "send one file per task"),
    ("unknown priority", {"data": {"priority": "asap"}, "files": {"file": ("a.md", b"# a")}}, 400,
     "priority must be one of low, normal, high, urgent"),
    ("unknown gpu preference", {"data": {"gpu": "maybe"}, "files": {"file": ("a.md", b"# a")}}, 400,
     "gpu must be one of require, prefer, never"),
    ("oversized form field", {"data": {"language": "x" * 5000}, "files": {"file": ("a.md", b"# a")}}, 400,
     "form field 'language' is too long"),
    ("broken multipart body", {"content": b"--xyz\r\nnot a header\r\n\r\n",
                               "headers": {"content-type": "multipart/form-data; boundary=xyz"}}, 400,
     "malformed multipart body"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "request_kw", "status", "error"), REQUESTS, ids=[c[0] for c in REQUESTS])
def test_bad_requests(client: TestClient, case: str, request_kw: dict, status: int, error: str) -> None:
    response = client.post("/api/v1/tasks", **request_kw)
    assert response.status_code == status, response.text
    assert error in response.json()["detail"]


@pytest.mark.parametrize(
    "filename",
    [
        "../../../../tmp/escape.md",
        "/etc/escape.md",
        "..\\..\\escape.md",
        ".hidden/../escape.md",
        "x" * 900 + ".md",
    ],
    ids=["relative traversal", "absolute path", "windows traversal", "dot folder", "very long name"],
)
def test_upload_names_cannot_escape_the_store(client: TestClient, services: Services, filename: str) -> None:
    response = client.post("/api/v1/tasks", files={"file": (filename, b"# notes\n")})
    assert response.status_code == 201, response.text
    task = response.json()
    stored = services.files.resolve(task["input"]["path"])
    assert stored.is_file() and stored.is_relative_to(services.files.root / "tasks" / task["id"] / "input")
    assert "/" not in task["filename"] and "\\" not in task["filename"] and len(stored.name) <= 200
    assert not Path("/tmp/escape.md").exists() and not Path("/etc/escape.md").exists()


def test_out_of_range_paging_is_a_422_not_a_crash(client: TestClient) -> None:
    """Found by schemathesis: an offset past SQLite's integers once made a 500."""
    response = client.get("/api/v1/tasks", params={"offset": 2**63})
    assert response.status_code == 422


def test_unknown_task_and_result_of_unfinished_task(client: TestClient) -> None:
    assert client.get("/api/v1/tasks/does-not-exist").status_code == 404
    task = client.post("/api/v1/tasks", files={"file": ("a.md", b"# a")}).json()
    response = client.get(f"/api/v1/tasks/{task['id']}/result")
    assert response.status_code == 409 and "task is queued" in response.json()["detail"]


def _claims(**changes: object) -> dict:
    now = int(time.time())
    claims = {
        "iss": "morag-pipeline",
        "sub": "box",
        "cap": "gpu",
        "iat": now,
        "exp": now + 600,
        "typ": "worker",
    }
    return {**claims, **changes}


TOKENS = [
    ("forged with another secret", lambda s: jwt.encode(_claims(jti="x"), "c" * 48, algorithm="HS256"),
     None, "Signature verification failed"),
    ("unsigned (alg none)", lambda s: jwt.encode(_claims(jti="x"), None, algorithm="none"), None,
     "invalid worker token"),
    ("expired", lambda s: s.tokens.issue("box", "gpu", 1)[0], None, "worker token expired"),
    ("revoked", lambda s: _revoked(s), None, "was revoked"),
    ("wrong capability", lambda s: s.tokens.issue("box", "cpu", 600)[0], "gpu",
     "is for cpu workers, not gpu"),
    ("unknown id", lambda s: jwt.encode(_claims(jti="nope"), SECRET, algorithm="HS256"), None,
     "unknown worker token"),
    ("not a token", lambda s: "hello", None, "invalid worker token"),
]  # fmt: skip


def _revoked(services: Services) -> str:
    token, record = services.tokens.issue("box", "gpu", 600)
    services.tokens.revoke(record.id)
    return token


@pytest.mark.parametrize(("case", "make", "capability", "error"), TOKENS, ids=[c[0] for c in TOKENS])
def test_bad_worker_tokens(services: Services, case: str, make, capability, error: str) -> None:  # type: ignore[no-untyped-def]
    token = make(services)
    if case == "expired":
        time.sleep(2.1)
    with pytest.raises(AuthError, match=error):
        services.tokens.verify(token, capability)


def test_output_whose_checksum_does_not_match_is_refused(services: Services, stub_broker) -> None:  # type: ignore[no-untyped-def]
    from pipeline.actors import control
    from pipeline.store import State, Task, new_task_id

    task = services.store.create(
        Task(new_task_id(), "convert", State.queued, "a.md", {"path": "x"}, {}, {"queue": "cpu"})
    )
    out = services.files.resolve(f"tasks/{task.id}/output/a.md")
    out.parent.mkdir(parents=True)
    out.write_text("# real\n")
    lie = {"path": f"tasks/{task.id}/output/a.md", "sha256": "0" * 64, "size": 7, "format": "md"}
    control.task_completed.fn(task.id, [lie], {}, "liar", time.time())
    failed = services.store.get(task.id)
    assert failed.state == State.failed
    assert failed.error.startswith("output failed verification: tasks/")
    assert failed.outputs == []


# Messages published straight to the queues, bypassing the API.


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_malformed_and_unknown_messages_are_dead_lettered_and_nothing_else_stops(stack: Stack) -> None:
    stack.start_server()
    stack.start_worker("cpu")
    stack.wait_consumers("cpu")
    url = stack.env["MORAG_BROKER_URL"]
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    for body in (b"{not json", b'{"queue_name": "cpu"}', b"\xff\xfe\x00binary"):
        channel.basic_publish("", "cpu", body, pika.BasicProperties(delivery_mode=2))
    connection.close()
    stray = dramatiq.Message("cpu", "format_disk", (), {"job": {}}, {})
    from pipeline.brokers.rabbitmq import build_rabbitmq_broker

    broker = build_rabbitmq_broker(Settings(broker_url=url))
    broker.enqueue(stray)
    broker.close()

    deadline = time.monotonic() + 60
    while queue_depth(url, "cpu.XQ") < 4 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert queue_depth(url, "cpu.XQ") == 4
    # The worker is still there and still works.
    proc = stack.cli("submit", str(SAMPLES / "report.html"))
    assert proc.returncode == 0, proc.stderr
    assert "Quarterly ingestion report" in proc.stdout


def test_pdf_helper_makes_a_valid_pdf(tmp_path: Path) -> None:
    """The fixture the PDF cases rely on is itself a readable PDF."""
    from pipeline.routing import classify

    path = tmp_path / "ok.pdf"
    path.write_bytes(make_pdf(["fine"]))
    assert classify(path, "ok.pdf").pages == 1
