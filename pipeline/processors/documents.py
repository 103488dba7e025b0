"""Document conversion with docling: HTML, DOCX, PPTX, XLSX, Markdown and PDF.

PDF layout analysis needs docling's models. When their folder is configured
(``artifacts_path``) PDFs go through docling's full pipeline, offline; without
it a PDF is converted as plain text per page, and the result says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import BadInput, ModelNotFound, PipelineError
from pipeline.processors import Progress, no_progress

# Our document kinds (see routing) and docling's InputFormat names for them.
DOCLING_FORMATS = {
    "html": "HTML",
    "docx": "DOCX",
    "pptx": "PPTX",
    "xlsx": "XLSX",
    "md": "MD",
    "pdf": "PDF",
}

TEXT_ONLY_NOTICE = (
    "PDF converted as text only: docling's layout models are not configured "
    "(set MORAG_DOCLING_ARTIFACTS_PATH to a folder of docling models for tables and layout)."
)


@dataclass
class Document:
    """A converted document."""

    markdown: str
    docling: dict[str, Any] | None
    doc_format: str
    pages: int | None = None
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    method: str = "docling"


def convert(
    path: Path,
    doc_format: str,
    *,
    artifacts_path: Path | None = None,
    progress: Progress = no_progress,
    source: str = "",
) -> Document:
    """Convert a document to Markdown (and docling's JSON where docling ran)."""
    if doc_format not in DOCLING_FORMATS:
        raise BadInput(f"unsupported document type {doc_format!r}")
    started = time.perf_counter()
    if doc_format == "pdf" and artifacts_path is None:
        progress("extracting text", 0.0)
        doc = _pdf_text_only(path, source)
    else:
        progress("converting", 0.0)
        doc = _docling(path, doc_format, artifacts_path)
    doc.timings["convert_s"] = round(time.perf_counter() - started, 3)
    progress("converting", 100.0)
    return doc


def _docling(path: Path, doc_format: str, artifacts_path: Path | None) -> Document:
    try:
        from docling.datamodel.base_models import ConversionStatus, InputFormat
        from docling.document_converter import DocumentConverter, PdfFormatOption
    except ImportError:
        raise PipelineError(
            "document conversion needs docling (pip install 'morag-pipeline[docs]')"
        ) from None
    input_format = InputFormat[DOCLING_FORMATS[doc_format]]
    options = {}
    if input_format is InputFormat.PDF:
        from docling.datamodel.pipeline_options import PdfPipelineOptions

        pdf = PdfPipelineOptions(artifacts_path=str(artifacts_path), do_ocr=False)
        options[InputFormat.PDF] = PdfFormatOption(pipeline_options=pdf)
    converter = DocumentConverter(allowed_formats=[input_format], format_options=options)
    try:
        result = converter.convert(path, raises_on_error=False)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if artifacts_path is not None and "artifacts_path" in str(exc):
            raise ModelNotFound(
                f"docling's PDF models are not in MORAG_DOCLING_ARTIFACTS_PATH={artifacts_path}: {first_line}"
            ) from None
        raise BadInput(f"docling could not read the {doc_format.upper()} file: {first_line}") from None
    if result.status not in (ConversionStatus.SUCCESS, ConversionStatus.PARTIAL_SUCCESS):
        errors = "; ".join(e.error_message for e in result.errors) or str(result.status)
        raise BadInput(f"docling could not convert the {doc_format.upper()} file: {errors}")
    notes = [e.error_message for e in result.errors]
    document = result.document
    pages = len(document.pages) if document.pages else None
    return Document(
        markdown=document.export_to_markdown(),
        docling=document.export_to_dict(),
        doc_format=doc_format,
        pages=pages,
        notes=notes,
    )


def _pdf_text_only(path: Path, source: str) -> Document:
    import pypdfium2

    try:
        pdf = pypdfium2.PdfDocument(str(path))
    except pypdfium2.PdfiumError as exc:
        raise BadInput(f"cannot read the PDF: {exc}") from None
    parts = [f"# {source or path.name}", "", f"> {TEXT_ONLY_NOTICE}", ""]
    try:
        for number, page in enumerate(pdf, 1):
            text = page.get_textpage().get_text_range().strip()
            parts += [f"## Page {number}", "", text, ""]
        pages = len(pdf)
    finally:
        pdf.close()
    return Document(
        markdown="\n".join(parts),
        docling=None,
        doc_format="pdf",
        pages=pages,
        notes=[TEXT_ONLY_NOTICE],
        method="pdf-text",
    )


def count_pdf_pages(path: Path) -> int | None:
    """Pages of a PDF, or None when it cannot be opened."""
    try:
        import pypdfium2

        pdf = pypdfium2.PdfDocument(str(path))
    except Exception:
        return None
    try:
        return len(pdf)
    finally:
        pdf.close()
