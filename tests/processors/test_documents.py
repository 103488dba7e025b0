"""docling conversion of every offline format, and the PDF text-only fallback."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import BadInput, ModelNotFound
from pipeline.processors import documents


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("html", ["# Quarterly ingestion report", "## Volumes by kind", "| Audio", "1200"]),
        ("docx", ["Budget review", "| GPU hours", "420"]),
        ("pptx", ["Roadmap", "Second GPU worker in March"]),
        ("xlsx", ["| Worker", "gpu-1", "420"]),
        ("md", ["# Meeting notes", "**SFTP**"]),
    ],
)
def test_converts_offline(office_files: dict[str, Path], fmt: str, expected: list[str]) -> None:
    doc = documents.convert(office_files[fmt], fmt)
    for fragment in expected:
        assert fragment in doc.markdown, doc.markdown
    assert doc.docling is not None and doc.docling["schema_name"] == "DoclingDocument"
    assert doc.method == "docling" and doc.notes == []


def test_pdf_without_models_falls_back_to_text_and_says_so(office_files: dict[str, Path]) -> None:
    doc = documents.convert(office_files["pdf"], "pdf", source="report.pdf")
    assert doc.method == "pdf-text"
    assert "Annual report" in doc.markdown and "Revenue grew" in doc.markdown
    assert doc.notes == [documents.TEXT_ONLY_NOTICE]
    assert documents.TEXT_ONLY_NOTICE in doc.markdown
    assert doc.pages == 1


def test_pdf_with_an_artifacts_folder_uses_docling(office_files: dict[str, Path], tmp_path: Path) -> None:
    """The model path is taken when configured; a folder without the models says which is missing."""
    with pytest.raises(ModelNotFound, match="PDF models are not in MORAG_DOCLING_ARTIFACTS_PATH=.*layout"):
        documents.convert(office_files["pdf"], "pdf", artifacts_path=tmp_path)


def test_unsupported_format() -> None:
    with pytest.raises(BadInput, match="unsupported document type 'odt'"):
        documents.convert(Path("x.odt"), "odt")
