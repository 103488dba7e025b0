"""Document conversion with docling: HTML, DOCX, PPTX, XLSX, Markdown and PDF.

PDF layout analysis needs docling's models. When their folder is configured
(``artifacts_path``) PDFs go through docling's full pipeline, offline; without
it a PDF is converted as plain text per page, and the result says so.

Every conversion runs in the worker process's document converter: one child
process (``pipeline.processors.isolation``), started on first use and kept,
with docling loaded, for the next document. It is capped at
``max_memory_mb`` of memory and ``time_limit_s`` seconds per document
(``MORAG_DOCUMENT_MAX_MEMORY_MB``, ``MORAG_DOCUMENT_TIME_LIMIT_S``); past
either it is killed and the document refused as ``BadInput``, so a
decompression bomb or a pathological file never takes the worker down. The
next document gets a fresh child.

Conversions of one worker process take turns in that child. docling already
spreads one conversion over the cores, and a child with docling loaded holds
close to a gigabyte before it reads a page, so a child per worker thread would
multiply both the idle memory and the worst case (each child up to the cap)
for little more throughput; run more worker processes for more conversions at
once. The time cap counts from when the child starts on the document, not from
when the thread began to wait for its turn.

A child that dies of something else (a segfault, the kernel's OOM killer) is a
transient error: the task is retried, in a fresh child. The same document
killing the child ``CRASHES_BEFORE_REFUSAL`` times in one worker process is
refused: a crash once may be the machine's, twice on the same bytes is the
file's.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import BadInput, ModelNotFound, PipelineError
from pipeline.processors import Progress, isolation, no_progress

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


#: Crashes of the converter on the same document (in one worker process) before it is refused.
CRASHES_BEFORE_REFUSAL = 2
#: Documents whose crashes are remembered, the most recent ones.
_CRASHES_KEPT = 256


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
    max_memory_mb: int | None = None,
    time_limit_s: float | None = None,
    progress: Progress = no_progress,
    source: str = "",
) -> Document:
    """Convert a document to Markdown (and docling's JSON where docling ran), in the capped child.

    ``max_memory_mb`` and ``time_limit_s`` default to the process's settings
    (``MORAG_DOCUMENT_MAX_MEMORY_MB``, ``MORAG_DOCUMENT_TIME_LIMIT_S``).
    """
    if doc_format not in DOCLING_FORMATS:
        raise BadInput(f"unsupported document type {doc_format!r}")
    limits = _limits(max_memory_mb, time_limit_s)
    started = time.perf_counter()
    text_only = doc_format == "pdf" and artifacts_path is None
    progress("extracting text" if text_only else "converting", 0.0)
    doc = convert_capped(path, doc_format, (path, doc_format, artifacts_path, source), limits)
    doc.timings["convert_s"] = round(time.perf_counter() - started, 3)
    progress("converting", 100.0)
    return doc


def convert_capped(
    path: Path,
    doc_format: str,
    args: tuple[Any, ...],
    limits: isolation.Limits,
    here: Callable[..., Document] | None = None,
) -> Document:
    """``here(*args)`` (``convert_here`` by default) run in the worker process's converter child,
    each cap turned into its reason. ``path`` and ``doc_format`` name the file the reasons speak of."""
    try:
        return converter().call(here or convert_here, args, limits)
    except isolation.CapExceeded as exc:
        raise _refusal(exc, doc_format) from None
    except isolation.ResultTooLarge:
        raise BadInput(
            f"the converted {doc_format.upper()} file is larger than the memory cap of "
            f"{limits.max_memory_mb} MB (MORAG_DOCUMENT_MAX_MEMORY_MB): raise it if the document is genuine"
        ) from None
    except isolation.ChildDied as exc:
        how = isolation.describe_exit(exc.exitcode)
        if exc.during_start:
            raise PipelineError(f"the document converter died while loading docling ({how})") from None
        if _crashed(path, doc_format) >= CRASHES_BEFORE_REFUSAL:
            raise BadInput(
                f"the {doc_format.upper()} file crashed the document converter "
                f"{CRASHES_BEFORE_REFUSAL} times ({how}): it cannot be converted"
            ) from None
        raise PipelineError(f"the document converter crashed ({how}); the task is retried") from None


def _refusal(exc: isolation.CapExceeded, doc_format: str) -> PipelineError:
    """The one-line reason for a cap: bad input, unless it was passed before the document was opened."""
    limits, kind = exc.limits, doc_format.upper()
    if exc.during_start and exc.cap == "memory":
        return PipelineError(
            f"the document converter passed its memory cap while loading docling, before it opened the "
            f"file ({exc}): raise MORAG_DOCUMENT_MAX_MEMORY_MB (now {limits.max_memory_mb})"
        )
    if exc.during_start:
        return PipelineError(f"the document converter could not load docling: {exc}")
    if exc.cap == "memory":
        return BadInput(
            f"the {kind} file needed more than {limits.max_memory_mb} MB of memory to convert and was "
            f"refused (MORAG_DOCUMENT_MAX_MEMORY_MB={limits.max_memory_mb}): it may be a decompression "
            "bomb; raise the limit if the document is genuine"
        )
    return BadInput(
        f"the {kind} file took longer than {limits.time_limit_s:g} s to convert and was refused "
        f"(MORAG_DOCUMENT_TIME_LIMIT_S={limits.time_limit_s:g}): raise the limit if the document is genuine"
    )


def _limits(max_memory_mb: int | None, time_limit_s: float | None) -> isolation.Limits:
    if max_memory_mb is None or time_limit_s is None:
        from pipeline.config import get_settings

        settings = get_settings()
        max_memory_mb = max_memory_mb or settings.document_max_memory_mb
        time_limit_s = time_limit_s or settings.document_time_limit_s
    return isolation.Limits(max_memory_mb=max_memory_mb, time_limit_s=time_limit_s)


_children: dict[str, isolation.CappedChild] = {}
_children_lock = threading.Lock()


def _child(name: str) -> isolation.CappedChild:
    with _children_lock:
        if name not in _children:
            _children[name] = isolation.CappedChild(name)
        return _children[name]


def converter() -> isolation.CappedChild:
    """The worker process's document converter, created on first use."""
    return _child("document converter")


def pdf_reader() -> isolation.CappedChild:
    """The process's PDF reader (the API server counts an upload's pages there), created on first use."""
    return _child("pdf reader")


_crashes: OrderedDict[str, int] = OrderedDict()
_crashes_lock = threading.Lock()


def _crashed(path: Path, doc_format: str) -> int:
    """Count a crash of the converter on this document (by content); returns its crashes so far."""
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else str(path)
    except OSError:
        digest = str(path)
    key = f"{doc_format}:{digest}"
    with _crashes_lock:
        _crashes[key] = _crashes.get(key, 0) + 1
        _crashes.move_to_end(key)
        while len(_crashes) > _CRASHES_KEPT:
            _crashes.popitem(last=False)
        return _crashes[key]


def convert_here(path: Path, doc_format: str, artifacts_path: Path | None, source: str) -> Document:
    """Convert in this process, uncapped: what the converter child runs."""
    if doc_format == "pdf" and artifacts_path is None:
        return _pdf_text_only(path, source)
    return _docling(path, doc_format, artifacts_path)


#: docling converters by (format, models folder), built once per converter child.
_docling_converters: dict[tuple[str, Path | None], Any] = {}


def _docling_converter(doc_format: str, artifacts_path: Path | None) -> Any:
    key = (doc_format, artifacts_path)
    if key in _docling_converters:
        return _docling_converters[key]
    try:
        from docling.datamodel.base_models import InputFormat
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
        converter.initialize_pipeline(input_format)  # loads the models, before the time cap counts
    except Exception as exc:
        raise _docling_error(exc, doc_format, artifacts_path) from None
    _docling_converters[key] = converter
    return converter


def _docling_error(exc: Exception, doc_format: str, artifacts_path: Path | None) -> PipelineError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if artifacts_path is not None and "artifacts_path" in str(exc):
        return ModelNotFound(
            f"docling's PDF models are not in MORAG_DOCLING_ARTIFACTS_PATH={artifacts_path}: {first_line}"
        )
    return BadInput(f"docling could not read the {doc_format.upper()} file: {first_line}")


def _docling(path: Path, doc_format: str, artifacts_path: Path | None) -> Document:
    converter = _docling_converter(doc_format, artifacts_path)
    from docling.datamodel.base_models import ConversionStatus

    isolation.started()
    try:
        result = converter.convert(path, raises_on_error=False)
    except Exception as exc:
        raise _docling_error(exc, doc_format, artifacts_path) from None
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

    isolation.started()
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


def count_pdf_pages_capped(path: Path, max_memory_mb: int, time_limit_s: float) -> int | None:
    """``count_pdf_pages`` in the process's PDF reader child, under a memory and a time cap.

    Opening a PDF can inflate its object streams: a 1 MB file can cost gigabytes,
    which the child pays, not the caller. Past a cap, or when the child dies,
    the PDF is refused as BadInput with the reason.
    """
    limits = isolation.Limits(max_memory_mb=max_memory_mb, time_limit_s=time_limit_s)
    try:
        return pdf_reader().call(_count_pages_in_child, (path,), limits)
    except isolation.CapExceeded as exc:
        if exc.cap == "memory":
            raise BadInput(
                f"the PDF needed more than {max_memory_mb} MB of memory to open "
                f"(MORAG_DOCUMENT_MAX_MEMORY_MB={max_memory_mb}): it may be a decompression bomb"
            ) from None
        raise BadInput(
            f"the PDF took longer than {time_limit_s:g} s to open (MORAG_DOCUMENT_TIME_LIMIT_S)"
        ) from None
    except isolation.ChildDied as exc:
        raise BadInput(f"the PDF crashed the PDF reader ({isolation.describe_exit(exc.exitcode)})") from None


def _count_pages_in_child(path: Path) -> int | None:
    isolation.started()  # nothing to load: every cap counts against the file
    return count_pdf_pages(path)


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
