"""Document conversion runs in a capped child process: a decompression bomb or a document that
never finishes is refused with the cap's reason, the worker process is untouched, and the next
document converts in a fresh child."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from dramatiq.middleware import TimeLimitExceeded

from pipeline.errors import BadInput, PipelineError
from pipeline.processors import documents
from tests.conftest import wait_for

#: Low caps keep each test fast; 256 MB is the lowest MORAG_DOCUMENT_MAX_MEMORY_MB allows.
LOW_MEMORY_MB = 256
ROOMY_MEMORY_MB = 8192
LOW_TIME_S = 2


def resident_mb() -> float:
    """This (the worker's) process's resident memory, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def flate_bomb_pdf(path: Path, unpacked_mb: int) -> Path:
    """A one-page PDF whose content stream is ``unpacked_mb`` MB of blanks, deflated to a
    thousandth of that: PDFium inflates it whole to read the page."""
    packer = zlib.compressobj(9)
    blanks = b" " * (1024 * 1024)
    data = packer.compress(b"BT /F1 12 Tf 50 750 Td (Bomb) Tj ET ")
    data += b"".join(packer.compress(blanks) for _ in range(unpacked_mb)) + packer.flush()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(data) + data + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(out)
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Half a megabyte of PDF that inflates to 1 GB."""
    return flate_bomb_pdf(tmp_path_factory.mktemp("bomb") / "bomb.pdf", 1024)


@pytest.fixture
def stalled(tmp_path: Path) -> Path:
    """An HTML "file" that never ends: a named pipe nobody writes to, so the converter reading it
    runs until it is stopped, as a pathological document does."""
    path = tmp_path / "endless.html"
    os.mkfifo(path)
    return path


def read_by_converter(fifo: Path) -> int | None:
    """A write end of ``fifo``, opened once the converter has it open for reading (else None).

    Holding it keeps the reader waiting for data rather than reading the end of the file.
    """
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return None


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


@pytest.fixture
def converter_pid(office_files: dict[str, Path]) -> Iterator[int]:
    """The converter child's process id, after a normal conversion started it."""
    documents.convert(office_files["pdf"], "pdf", max_memory_mb=LOW_MEMORY_MB, time_limit_s=60)
    pid = documents.converter().pid
    assert pid is not None and pid != os.getpid()
    yield pid


@pytest.mark.parametrize("fmt", ["docx", "html", "pdf"])
def test_a_document_converts_in_the_child_exactly_as_in_process(
    office_files: dict[str, Path], fmt: str
) -> None:
    capped = documents.convert(office_files[fmt], fmt, max_memory_mb=ROOMY_MEMORY_MB, time_limit_s=120)
    child = documents.converter().pid
    assert child is not None and child != os.getpid()
    here = documents.convert_here(office_files[fmt], fmt, None, "")
    assert capped.markdown == here.markdown
    assert capped.docling == here.docling
    assert (capped.pages, capped.notes, capped.method) == (here.pages, here.notes, here.method)


def test_a_decompression_bomb_is_refused_at_the_memory_cap(converter_pid: int, bomb: Path) -> None:
    before = resident_mb()
    with pytest.raises(BadInput) as refused:
        documents.convert(bomb, "pdf", max_memory_mb=LOW_MEMORY_MB, time_limit_s=60)
    grown = resident_mb() - before
    assert str(refused.value) == (
        "the PDF file needed more than 256 MB of memory to convert and was refused "
        "(MORAG_DOCUMENT_MAX_MEMORY_MB=256): it may be a decompression bomb; "
        "raise the limit if the document is genuine"
    )
    assert not alive(converter_pid)
    assert grown < 50, f"the worker process grew by {grown:.0f} MB"


def test_a_conversion_past_the_time_cap_is_killed_and_refused(stalled: Path) -> None:
    with pytest.raises(BadInput) as refused:
        documents.convert(stalled, "html", max_memory_mb=ROOMY_MEMORY_MB, time_limit_s=LOW_TIME_S)
    assert str(refused.value) == (
        "the HTML file took longer than 2 s to convert and was refused "
        "(MORAG_DOCUMENT_TIME_LIMIT_S=2): raise the limit if the document is genuine"
    )
    assert documents.converter().pid is None  # killed; the next document starts another


def test_after_each_refusal_the_next_document_converts(
    office_files: dict[str, Path], bomb: Path, stalled: Path
) -> None:
    with pytest.raises(BadInput, match="MORAG_DOCUMENT_MAX_MEMORY_MB"):
        documents.convert(bomb, "pdf", max_memory_mb=LOW_MEMORY_MB, time_limit_s=60)
    doc = documents.convert(office_files["docx"], "docx", max_memory_mb=ROOMY_MEMORY_MB, time_limit_s=120)
    assert "Budget review" in doc.markdown and "| GPU hours" in doc.markdown

    with pytest.raises(BadInput, match="MORAG_DOCUMENT_TIME_LIMIT_S"):
        documents.convert(stalled, "html", max_memory_mb=ROOMY_MEMORY_MB, time_limit_s=LOW_TIME_S)
    doc = documents.convert(office_files["html"], "html", max_memory_mb=ROOMY_MEMORY_MB, time_limit_s=120)
    assert "# Quarterly ingestion report" in doc.markdown


def test_a_crash_is_retried_and_the_same_document_crashing_again_is_refused(
    office_files: dict[str, Path], stalled: Path
) -> None:
    """A converter that dies of a signal it was not sent by the caps: the first time the task is
    retried (not bad input); the same document crashing it again is refused."""

    def crash_while_converting() -> PipelineError:
        outcome: list[BaseException] = []

        def run() -> None:
            try:
                documents.convert(stalled, "html", max_memory_mb=ROOMY_MEMORY_MB, time_limit_s=120)
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        writer = wait_for("the converter to open the document", lambda: read_by_converter(stalled))
        try:
            pid = documents.converter().pid
            assert pid is not None
            os.kill(pid, signal.SIGSEGV)
            thread.join(timeout=60)
        finally:
            os.close(writer)
        assert len(outcome) == 1 and isinstance(outcome[0], PipelineError), outcome
        return outcome[0]

    first = crash_while_converting()
    assert not isinstance(first, BadInput)
    assert str(first) == "the document converter crashed (killed by SIGSEGV); the task is retried"

    doc = documents.convert(office_files["docx"], "docx", max_memory_mb=ROOMY_MEMORY_MB, time_limit_s=120)
    assert "Budget review" in doc.markdown

    second = crash_while_converting()
    assert isinstance(second, BadInput)
    assert str(second) == (
        "the HTML file crashed the document converter 2 times (killed by SIGSEGV): it cannot be converted"
    )


def test_a_time_limit_reaching_the_waiting_thread_kills_the_conversion(stalled: Path) -> None:
    """Dramatiq's own time limit (an exception raised in the worker thread) stops the child too."""
    raised: list[BaseException] = []

    def convert() -> None:
        try:
            documents.convert(stalled, "html", max_memory_mb=ROOMY_MEMORY_MB, time_limit_s=120)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=convert)
    thread.start()
    writer = wait_for("the converter to open the document", lambda: read_by_converter(stalled))
    try:
        pid = documents.converter().pid
        assert pid is not None
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(thread.ident), ctypes.py_object(TimeLimitExceeded)
        )
        thread.join(30)
    finally:
        os.close(writer)
    assert [type(exc) for exc in raised] == [TimeLimitExceeded]
    assert not alive(pid)
