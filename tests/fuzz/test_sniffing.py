"""Fuzzes content sniffing (``pipeline.routing.classify``), what every upload meets first.

Random bytes, and real samples mutated (HTML, a DOCX, an MP3's header, ZIP
archives with random central-directory fields, PDF headers), under random
file names. ``classify`` returns a Classification or refuses with BadInput
(UnsupportedType among them), never another exception, and never hangs
(each example has a deadline of a few seconds; media go through ffprobe).
"""

from __future__ import annotations

import io
import struct
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import Settings
from pipeline.errors import BadInput
from pipeline.routing import Classification, classify
from tests.conftest import SAMPLES
from tests.fuzz.conftest import examples

pytestmark = pytest.mark.fuzz


def _docx() -> bytes:
    import docx

    document = docx.Document()
    document.add_heading("Fuzzing", 1)
    document.add_paragraph("A paragraph to mutate.")
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def _zip(entries: int) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        archive.writestr("word/document.xml", "<w:document/>" * 50)
        for n in range(entries):
            archive.writestr(f"e{n}", b"")
    return out.getvalue()


SEEDS = {
    "html": (SAMPLES / "report.html").read_bytes(),
    "docx": _docx(),
    "zip": _zip(3),
    "mp3": (SAMPLES / "speech.mp3").read_bytes()[:8192],
    "pdf": b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
    b"2 0 obj<</Type/Pages/Count 1/Kids[]>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n",
    "markdown": b"# Title\n\nSome *text*.\n",
}


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """``seed`` with a few bytes overwritten, inserted or cut, or truncated."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        op = draw(st.sampled_from(["set", "insert", "cut", "truncate"]))
        if op == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(max_size=16))
        elif op == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif op == "truncate":
            del data[at:]
    return bytes(data)


@st.composite
def zip_directory_mutations(draw: st.DrawFn) -> bytes:
    """A ZIP whose end-of-central-directory or central-directory fields hold random numbers."""
    data = bytearray(SEEDS[draw(st.sampled_from(["zip", "docx"]))])
    end = data.rfind(b"PK\x05\x06")
    central = data.find(b"PK\x01\x02")
    # (offset from the record, struct format) of the counts, sizes and offsets a reader trusts.
    fields = [(end, o, f) for o, f in ((8, "<H"), (10, "<H"), (12, "<I"), (16, "<I"), (20, "<H"))]
    fields += [(central, o, f) for o, f in ((20, "<I"), (24, "<I"), (28, "<H"), (30, "<H"), (42, "<I"))]
    for record, offset, fmt in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=4)):
        limit = 2 ** (8 * struct.calcsize(fmt)) - 1
        value = draw(st.sampled_from([0, 1, limit, limit - 1]) | st.integers(0, limit))
        struct.pack_into(fmt, data, record + offset, value)
    return bytes(data)


contents = st.one_of(
    st.binary(min_size=1, max_size=512),
    *(mutated(seed) for name, seed in SEEDS.items() if name != "mp3"),
    zip_directory_mutations(),
    st.sampled_from([b"PK\x03\x04", b"%PDF-", b"PK\x03\x04" + b"\x00" * 100, b"\xef\xbb\xbf", b"\xff\xfe"]),
)
names = st.text(max_size=40) | st.sampled_from(
    ["report.html", "a.docx", "a.pdf", "a.mp3", "a.MP4", ".docx", "a.md", "x" * 300, "a.xlsx", "a.pptx"]
)


@pytest.fixture(scope="module")
def sniff(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Settings]]:
    folder = tmp_path_factory.mktemp("sniff")
    yield folder, Settings(data_dir=folder / "data", secret_key="x" * 48, max_zip_entries=100)


def classified_or_refused(folder: Path, settings: Settings, content: bytes, filename: str) -> None:
    with tempfile.NamedTemporaryFile(dir=folder, delete=False) as f:
        f.write(content)
    path = Path(f.name)
    try:
        found = classify(path, filename, settings)
    except BadInput as exc:
        assert str(exc).strip() and "\n" not in str(exc).strip()  # a one-line reason
        return
    finally:
        path.unlink()
    assert isinstance(found, Classification)
    assert found.size == len(content)


@settings(max_examples=examples(150))
@given(contents, names)
def test_classify_answers_or_refuses(sniff: tuple[Path, Settings], content: bytes, filename: str) -> None:
    classified_or_refused(*sniff, content, filename)


@settings(max_examples=examples(25))
@given(mutated(SEEDS["mp3"]), names)
def test_classify_of_mutated_media(sniff: tuple[Path, Settings], content: bytes, filename: str) -> None:
    classified_or_refused(*sniff, content, filename)
