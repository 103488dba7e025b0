"""What one client may cost the server: each limit is refused with a 4xx and the reason.

ZIP bombs (many entries, a lying entry count, a huge declared size), Whisper
models outside the allowlist, a disk short of space, a daily quota per key,
and the authentication rate limiter (per key and address, pruned, bounded).
The ZIP bomb of many entries goes to a real server, whose peak memory is read
from /proc; the rest run in-process.
"""

from __future__ import annotations

import shutil
import struct
import tracemalloc
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pipeline.api.app import create_app
from pipeline.api.auth import Authenticator
from pipeline.config import Settings, use_settings
from pipeline.errors import BadInput
from pipeline.routing import classify
from pipeline.security.ratelimit import FailureLimiter
from pipeline.services import build_services
from tests.conftest import Stack, make_pdf

SECRET = "q" * 48
MIB = 1024 * 1024


def zip_of_entries(
    path: Path, entries: int, *, declared: int | None = None, size: int = 0, zip64_size: int | None = None
) -> Path:
    """A ZIP whose central directory lists ``entries`` entries (the first ``word/document.xml``).

    ``declared`` is the entry count its end record claims (default: the real
    one); each entry declares ``size`` uncompressed bytes, or ``zip64_size``
    in a ZIP64 extra field. Written as it goes: the test process stays small.
    """
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    extra = b"" if zip64_size is None else struct.pack("<2HQ", 1, 8, zip64_size)
    written = len(local)
    with path.open("wb") as f:
        f.write(local)
        for i in range(entries):
            name = b"word/document.xml" if i == 0 else b"%x" % i
            declared_size = 0xFFFFFFFF if zip64_size is not None else size
            header = struct.pack(
                "<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, 0, 0, declared_size,
                len(name), len(extra), 0, 0, 0, 0, 0,
            )  # fmt: skip
            f.write(header + name + extra)
        cd_size = f.tell() - written
        count = entries if declared is None else declared
        if count > 0xFFFF:  # ZIP64 end records hold the count
            at = f.tell()
            f.write(
                struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, cd_size, written)
            )
            f.write(struct.pack("<4sLQL", b"PK\x06\x07", 0, at, 1))
            count = 0xFFFF
        f.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, cd_size, written, 0))
    return path


def peak_rss(pid: int) -> int:
    """The process's peak resident memory in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def test_a_zip_of_many_entries_is_refused_and_the_server_stays_small(stack: Stack, tmp_path: Path) -> None:
    bomb = zip_of_entries(tmp_path / "report.docx", 400_000)
    assert bomb.stat().st_size > 18 * MIB
    stack.start_server()
    pid = stack.processes["server"].pid
    before = peak_rss(pid)
    with bomb.open("rb") as f:
        response = stack.post("/api/v1/tasks", files={"file": ("report.docx", f)}, timeout=120)
    assert response.status_code == 400, response.text
    assert response.json()["detail"] == "report.docx: a ZIP of 400000 entries; at most 10000 are accepted"
    grown = peak_rss(pid) - before
    assert grown < 50 * MIB, f"the server's peak memory grew by {grown // MIB} MiB"


def pdf_with_inflating_object_stream(path: Path, inflated: int) -> Path:
    """A one-page PDF whose catalog and page tree sit in an object stream padded to ``inflated``
    bytes once decompressed: opening it, even to count its pages, inflates the whole stream."""
    head = b"<< /Type /Catalog /Pages 2 0 R >> "
    objects = b"1 0 2 %d " % len(head)
    data = objects + head + b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>"
    packer = zlib.compressobj(9)
    stream = packer.compress(data) + b"".join(packer.compress(b" " * MIB) for _ in range(inflated // MIB))
    stream += packer.flush()
    out = bytearray(b"%PDF-1.5\n")
    page_at = len(out)
    out += b"3 0 obj\n<< /Type /Page /Parent 2 0 R /MediaBox [0 0 100 100] >>\nendobj\n"
    stream_at = len(out)
    out += b"4 0 obj\n<< /Type /ObjStm /N 2 /First %d /Filter /FlateDecode /Length %d >>\nstream\n" % (
        len(objects),
        len(stream),
    )
    out += stream + b"\nendstream\nendobj\n"
    xref_at = len(out)
    entries = [(0, 0, 0xFFFF), (2, 4, 0), (2, 4, 1), (1, page_at, 0), (1, stream_at, 0), (1, xref_at, 0)]
    table = b"".join(struct.pack(">BIH", *entry) for entry in entries)
    out += b"5 0 obj\n<< /Type /XRef /Size 6 /W [1 4 2] /Root 1 0 R /Length %d >>\nstream\n" % len(table)
    out += table + b"\nendstream\nendobj\nstartxref\n%d\n%%%%EOF\n" % xref_at
    path.write_bytes(bytes(out))
    return path


def test_a_pdf_that_inflates_when_opened_is_refused_and_the_server_stays_small(
    stack: Stack, tmp_path: Path
) -> None:
    """The server counts an upload's pages in a capped child process: a 1 MB PDF that costs
    gigabytes to open is refused, and the server itself does not grow."""
    bomb = pdf_with_inflating_object_stream(tmp_path / "bomb.pdf", 1024 * MIB)
    assert bomb.stat().st_size < 2 * MIB
    stack.env["MORAG_DOCUMENT_MAX_MEMORY_MB"] = "256"
    stack.start_server()
    pid = stack.processes["server"].pid
    before = peak_rss(pid)
    with bomb.open("rb") as f:
        response = stack.post("/api/v1/tasks", files={"file": ("bomb.pdf", f)}, timeout=120)
    assert response.status_code == 400, response.text
    assert response.json()["detail"] == (
        "bomb.pdf: the PDF needed more than 256 MB of memory to open (MORAG_DOCUMENT_MAX_MEMORY_MB=256): "
        "it may be a decompression bomb"
    )
    grown = peak_rss(pid) - before
    assert grown < 50 * MIB, f"the server's peak memory grew by {grown // MIB} MiB"
    # The next PDF is read by a fresh child and accepted.
    report = tmp_path / "report.pdf"
    report.write_bytes(make_pdf(["Annual report"]))
    with report.open("rb") as f:
        response = stack.post("/api/v1/tasks", files={"file": ("report.pdf", f)}, timeout=120)
    assert response.status_code == 201, response.text
    assert response.json()["input"]["media"]["pages"] == 1


def test_a_zip_is_judged_by_its_end_record_before_its_directory(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, max_zip_entries=100)
    declared = zip_of_entries(tmp_path / "declared.docx", 101)
    with pytest.raises(BadInput, match=r"^declared.docx: a ZIP of 101 entries; at most 100 are accepted$"):
        classify(declared, "declared.docx", settings)
    # An end record that lies about the count does not get the directory parsed whole.
    lying = zip_of_entries(tmp_path / "lying.docx", 200_000, declared=1)
    tracemalloc.start()
    try:
        with pytest.raises(BadInput, match="a ZIP of more than 100 entries, the most accepted"):
            classify(lying, "lying.docx", settings)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MIB, f"sniffing took {peak} bytes"


def test_a_zip_that_would_unpack_too_big_is_refused(tmp_path: Path, docx_file: Path) -> None:
    settings = Settings(data_dir=tmp_path, max_zip_uncompressed_mb=1024)
    plain = zip_of_entries(tmp_path / "plain.docx", 3, size=400 * MIB)
    with pytest.raises(BadInput, match=r"plain.docx: a ZIP whose contents unpack to more than 1024 MiB"):
        classify(plain, "plain.docx", settings)
    zip64 = zip_of_entries(tmp_path / "zip64.docx", 1, zip64_size=5 * 1024 * MIB)
    with pytest.raises(BadInput, match=r"zip64.docx: a ZIP whose contents unpack to more than 1024 MiB"):
        classify(zip64, "zip64.docx", settings)
    # Within the limits, a real document is what it is.
    assert (
        classify(zip_of_entries(tmp_path / "small.docx", 3, size=MIB), "small.docx", settings).format
        == "docx"
    )
    assert classify(docx_file, "budget.docx", settings).format == "docx"


@contextmanager
def api(
    folder: Path, broker: object, limiter: FailureLimiter | None = None, **settings: object
) -> Iterator[TestClient]:
    """The API in-process with ``settings``, out of development mode, with an admin key in every request."""
    services = build_services(use_settings(Settings(data_dir=folder, secret_key=SECRET, **settings)))
    auth = Authenticator(services.apikeys, services.tokens, limiter or FailureLimiter(max_failures=10**6))
    key, _ = services.apikeys.create("tests", "admin")
    with TestClient(create_app(services, broker, gpu_workers=lambda: 1, auth=auth)) as client:
        client.headers["Authorization"] = f"Bearer {key}"
        client.services = services  # type: ignore[attr-defined]
        yield client


def upload(client: TestClient, name: str, content: bytes, **fields: str):  # type: ignore[no-untyped-def]
    return client.post("/api/v1/tasks", files={"file": (name, content)}, data=fields)


PAGE = b"<!doctype html><html><body><h1>Budget</h1><p>GPU spending fell.</p></body></html>"


def test_only_allowed_whisper_models_are_accepted(tmp_path: Path, stub_broker) -> None:  # type: ignore[no-untyped-def]
    with api(tmp_path / "default", stub_broker) as client:
        refused = upload(client, "page.html", PAGE, model="large-v3")
        assert refused.status_code == 400
        assert refused.json()["detail"] == (
            "model 'large-v3' is not allowed here; allowed: tiny.en (MORAG_WHISPER_ALLOWED_MODELS)"
        )
        assert upload(client, "page.html", PAGE, model="tiny.en").status_code == 201
    with api(tmp_path / "listed", stub_broker, whisper_allowed_models="tiny.en, base.en") as client:
        accepted = upload(client, "page.html", PAGE, model="base.en")
        assert accepted.status_code == 201 and accepted.json()["options"]["model"] == "base.en"
        refused = upload(client, "page.html", PAGE, model="../../models/evil")
        assert refused.status_code == 400 and "allowed: tiny.en, base.en" in refused.json()["detail"]
    assert not list((tmp_path / "default" / "uploads").iterdir())  # refused uploads leave nothing


def test_an_upload_is_refused_when_the_disk_is_short_of_space(tmp_path: Path, stub_broker) -> None:  # type: ignore[no-untyped-def]
    free_mb = shutil.disk_usage(tmp_path).free // MIB
    with api(tmp_path, stub_broker, min_free_disk_mb=free_mb + 1024) as client:
        response = upload(client, "page.html", PAGE)
    assert response.status_code == 507
    detail = response.json()["detail"]
    assert detail.startswith("the server is short of disk space: ") and "(MORAG_MIN_FREE_DISK_MB)" in detail
    assert not list((tmp_path / "uploads").iterdir())


def test_a_disk_that_fills_during_an_upload_stops_it(
    tmp_path: Path,
    stub_broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    import pipeline.api.uploads as uploads

    real = shutil.disk_usage
    calls = []

    def filling(path):  # type: ignore[no-untyped-def]
        calls.append(path)
        usage = real(path)
        # Plenty at the start; then the disk is down to 100 MiB free.
        return usage if len(calls) == 1 else usage._replace(free=100 * MIB)

    monkeypatch.setattr(uploads.shutil, "disk_usage", filling)
    with api(tmp_path, stub_broker, min_free_disk_mb=512, max_document_mb=64) as client:
        response = upload(client, "notes.md", b"# Notes\n" + b"word " * (4 * MIB))
    assert response.status_code == 507, response.text
    assert "100 MiB free, and it keeps 512 MiB free" in response.json()["detail"]
    assert len(calls) >= 2  # checked before the upload and again while it streamed
    assert not list((tmp_path / "uploads").iterdir())


def test_a_key_over_its_daily_quota_is_refused(tmp_path: Path, stub_broker) -> None:  # type: ignore[no-untyped-def]
    half = b"# Notes\n" + b"w" * (512 * 1024 - 8)  # 512 KiB
    notes = b"# Notes\n" + b"word " * (120 * 1024)  # 600 KiB
    with api(tmp_path, stub_broker, quota_mb_per_day=1) as client:
        assert upload(client, "a.md", half).status_code == 201
        assert upload(client, "b.md", half).status_code == 201
        spent = upload(client, "page.html", PAGE)
        assert spent.status_code == 429
        assert spent.json()["detail"] == (
            "over the daily upload quota of 1 MiB for this API key (MORAG_QUOTA_MB_PER_DAY);"
            " it renews at midnight UTC"
        )
        # Each key has its own quota; an upload that would pass it is cut off as it streams in.
        other, _ = client.services.apikeys.create("other", "client")  # type: ignore[attr-defined]
        assert upload_as(client, other, "notes.md", notes).status_code == 201
        over = upload_as(client, other, "notes.md", notes)
        assert over.status_code == 429
        assert over.json()["detail"].startswith("notes.md: over the daily upload quota of 1 MiB")
        assert upload_as(client, other, "page.html", PAGE).status_code == 201  # what is left still counts
    assert not list((tmp_path / "uploads").iterdir())


def upload_as(client: TestClient, key: str, name: str, content: bytes):  # type: ignore[no-untyped-def]
    return client.post(
        "/api/v1/tasks", files={"file": (name, content)}, headers={"Authorization": f"Bearer {key}"}
    )


def bad_key(i: int) -> str:
    return f"mpk_{i:012x}_not-the-secret"


def test_bad_keys_behind_one_address_do_not_lock_out_a_good_key(tmp_path: Path, stub_broker) -> None:  # type: ignore[no-untyped-def]
    # Every request of the test client comes from one address, as from behind a NAT.
    with api(tmp_path, stub_broker, FailureLimiter(max_failures=3, window_s=600)) as client:
        for i in range(10):
            codes = [client.get("/api/v1/tasks", headers=bearer(bad_key(i))).status_code for _ in range(4)]
            assert codes == [401, 401, 401, 429]  # each bad key is locked out after its own failures
        assert client.get("/api/v1/tasks").status_code == 200  # the good key still works
        # A guessed secret for a real key's id locks out that key from that address only.
        _, record = client.services.apikeys.create("victim", "client")  # type: ignore[attr-defined]
        guess = f"mpk_{record.id}_guessed"
        assert [client.get("/api/v1/tasks", headers=bearer(guess)).status_code for _ in range(4)] == [
            401, 401, 401, 429,
        ]  # fmt: skip
        assert client.get("/api/v1/tasks").status_code == 200


def test_garbage_from_one_address_blocks_that_address(tmp_path: Path, stub_broker) -> None:  # type: ignore[no-untyped-def]
    with api(tmp_path, stub_broker, FailureLimiter(max_failures=3, window_s=600)) as client:
        for _ in range(3):
            assert client.get("/api/v1/tasks", headers=bearer("not a key")).status_code == 401
        blocked = client.get("/api/v1/tasks")
        assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) > 0


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_limiter_forgets_old_failures_and_stays_bounded() -> None:
    clock = Clock()
    limiter = FailureLimiter(max_failures=2, window_s=60, max_clients=100, clock=clock)
    for i in range(1000):
        limiter.failed(("10.0.0.1", f"{i:012x}"))
    assert limiter.remembered() == 100  # bounded: the longest quiet are forgotten
    limiter.failed("10.0.0.2")
    limiter.failed("10.0.0.2")
    assert limiter.retry_after("10.0.0.2") > 0  # the latest are remembered
    clock.now += 61
    assert limiter.retry_after("10.0.0.2") == 0
    assert limiter.remembered() == 0  # failures older than the window are dropped, and their clients
