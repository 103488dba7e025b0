"""Images (PNG, JPEG, TIFF, WebP): the text in them by OCR, and their metadata.

OCR is RapidOCR's: its ONNX models (text detection, direction, recognition)
ship in its wheel, so it reads offline. When docling's layout models are
configured (``MORAG_DOCLING_ARTIFACTS_PATH``) the image goes through docling's
image pipeline, with RapidOCR and the same models, which adds layout
(headings, lists, tables); without them RapidOCR alone reads the lines, top to
bottom, and the result says so. A TIFF of several pages is read page by page.

The metadata are Pillow's: format, size, mode, and the EXIF tags by name
(camera, date taken, orientation, GPS…).

With ``MORAG_CAPTION_MODEL_PATH`` set, a captioning model from that folder
(``pipeline.processors.captions``) adds a caption, in the worker process.

Reading runs in the worker process's document converter child, under the
same memory and time caps as documents (``pipeline.processors.documents``):
an image that would decompress to gigabytes is refused, not the worker's end.
A file Pillow cannot read is refused as BadInput with its reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any

from pipeline.config import Settings
from pipeline.errors import BadInput
from pipeline.kinds import Outputs
from pipeline.processors import Progress, captions, documents, isolation

#: The first bytes of each format read.
SIGNATURES = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpeg", b"II*\x00": "tiff", b"MM\x00*": "tiff"}
#: Pages of a TIFF read at most.
MAX_PAGES = 100
OCR_ONLY_NOTICE = (
    "read by RapidOCR line by line: docling's layout models are not configured "
    "(set MORAG_DOCLING_ARTIFACTS_PATH to a folder of docling models for layout and tables)."
)


def sniff(head: bytes) -> str | None:
    """The image format of a file's first bytes (png, jpeg, tiff, webp), or None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    for signature, fmt in SIGNATURES.items():
        if head.startswith(signature):
            return fmt
    return None


def read(path: Path, fmt: str, settings: Settings, source: str = "") -> documents.Document:
    """OCR text and metadata of an image, in the capped converter child.

    The Document's ``docling`` holds the JSON output: metadata, text, and each
    line with its confidence and box (or docling's document, with docling).
    """
    limits = isolation.Limits(settings.document_max_memory_mb, settings.document_time_limit_s)
    args = (path, fmt, settings.docling_artifacts_path, source)
    return documents.convert_capped(path, fmt, args, limits, here=read_here)


def read_here(path: Path, fmt: str, artifacts_path: Path | None, source: str) -> documents.Document:
    """Read in this process, uncapped: what the converter child runs."""
    engine = _rapidocr() if artifacts_path is None else None
    converter = _docling(artifacts_path) if artifacts_path is not None else None
    isolation.started()  # the engine is loaded: from here on every cap counts against the file
    pages, about = _open(path, fmt)
    if converter is not None:
        return _with_docling(converter, path, fmt, about, source)
    lines: list[dict[str, Any]] = []
    for number, page in enumerate(pages, 1):
        lines += [{**line, "page": number} for line in _ocr(engine, page)]
    text = "\n".join(line["text"] for line in lines)
    data = {**about, "text": text, "lines": lines, "method": "rapidocr", "notes": [OCR_ONLY_NOTICE]}
    return documents.Document(
        markdown=_markdown(source or path.name, lines, about),
        docling=data,
        doc_format=fmt,
        pages=len(pages),
        notes=[OCR_ONLY_NOTICE],
        method="rapidocr",
    )


def _open(path: Path, fmt: str) -> tuple[list[Any], dict[str, Any]]:
    """The image's pages, loaded, and its metadata; BadInput when Pillow cannot read it."""
    from PIL import ExifTags, Image, ImageSequence, UnidentifiedImageError

    try:
        image = Image.open(path)
        pages = [page.convert("RGB") for page in islice(ImageSequence.Iterator(image), MAX_PAGES)]
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadInput(f"cannot read the {fmt.upper()} image: {exc}") from None
    exif = image.getexif()
    tags = {**exif, **exif.get_ifd(ExifTags.IFD.Exif)}
    named = {ExifTags.TAGS.get(tag, str(tag)): _plain(value) for tag, value in tags.items()}
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    if gps:
        named["GPSInfo"] = {ExifTags.GPSTAGS.get(tag, str(tag)): _plain(value) for tag, value in gps.items()}
    about = {
        "format": image.format or fmt.upper(),
        "width": image.width,
        "height": image.height,
        "mode": image.mode,
        "pages": getattr(image, "n_frames", 1),
        "exif": named,
    }
    return pages, about


def _plain(value: Any) -> Any:
    """An EXIF value as JSON can hold it."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace").rstrip("\x00")
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, int | float | str):
        return value
    try:
        return float(value)  # a rational
    except (TypeError, ValueError):
        return str(value)


_engine: Any = None


def _rapidocr() -> Any:
    """This process's RapidOCR engine, with the models of its wheel; CUDA where onnxruntime has it."""
    global _engine
    if _engine is None:
        import onnxruntime
        from rapidocr import RapidOCR

        cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        _engine = RapidOCR(params={"Global.log_level": "error", "EngineConfig.onnxruntime.use_cuda": cuda})
    return _engine


def _ocr(engine: Any, page: Any) -> list[dict[str, Any]]:
    import numpy

    found = engine(numpy.asarray(page)[:, :, ::-1])  # RapidOCR takes arrays as OpenCV's BGR
    texts = found.txts or ()
    return [
        {"text": text, "confidence": round(float(score), 4), "box": [[round(float(x)), round(float(y))]
         for x, y in box]}
        for text, score, box in zip(texts, found.scores, found.boxes, strict=True)
    ]  # fmt: skip


def _markdown(name: str, lines: list[dict[str, Any]], about: dict[str, Any]) -> str:
    parts = [f"# {name}", ""]
    pages = sorted({line["page"] for line in lines})
    for number in pages:
        if len(pages) > 1:
            parts += [f"## Page {number}", ""]
        parts += [line["text"] for line in lines if line["page"] == number] + [""]
    if not lines:
        parts += ["No text found.", ""]
    parts += [
        "## Metadata",
        "",
        f"- {about['format']}, {about['width']} x {about['height']} pixels, {about['mode']}",
    ]
    for tag in ("Make", "Model", "DateTimeOriginal", "DateTime", "Artist", "ImageDescription", "Software"):
        if tag in about["exif"]:
            parts.append(f"- {tag}: {about['exif'][tag]}")
    return "\n".join([*parts, ""])


def _docling(artifacts_path: Path) -> Any:
    """docling's image converter with RapidOCR on the models of its wheel, and the layout models of
    ``artifacts_path``."""
    import rapidocr
    from docling.datamodel.base_models import InputFormat
    from docling.datamodel.pipeline_options import PdfPipelineOptions, RapidOcrOptions
    from docling.document_converter import DocumentConverter, ImageFormatOption

    models = Path(rapidocr.__file__).parent / "models"
    ocr = RapidOcrOptions(
        det_model_path=str(next(models.glob("*det*.onnx"))),
        rec_model_path=str(next(models.glob("*rec*.onnx"))),
        cls_model_path=str(next(models.glob("*cls*.onnx"))),
    )
    options = PdfPipelineOptions(artifacts_path=str(artifacts_path), do_ocr=True, ocr_options=ocr)
    converter = DocumentConverter(
        allowed_formats=[InputFormat.IMAGE],
        format_options={InputFormat.IMAGE: ImageFormatOption(pipeline_options=options)},
    )
    converter.initialize_pipeline(InputFormat.IMAGE)
    return converter


def _with_docling(
    converter: Any, path: Path, fmt: str, about: dict[str, Any], source: str
) -> documents.Document:
    result = converter.convert(path, raises_on_error=False)
    if result.document is None or not result.document.pages:
        errors = "; ".join(e.error_message for e in result.errors) or str(result.status)
        raise BadInput(f"docling could not read the {fmt.upper()} image: {errors}")
    document = result.document
    text = document.export_to_text()
    return documents.Document(
        markdown=document.export_to_markdown(),
        docling={**about, "text": text, "method": "docling", "docling": document.export_to_dict()},
        doc_format=fmt,
        pages=len(document.pages),
        method="docling",
    )


def run(
    job: dict[str, Any],
    local: Path | None,
    folder: Path,
    settings: Settings,
    progress: Progress,
    should_stop: Callable[[], bool],
) -> tuple[Outputs, dict[str, Any]]:
    """The runner of image tasks: Markdown (text, then metadata) and JSON."""
    if local is None:
        raise BadInput("an image task needs an input file")
    progress("reading", 0.0)
    doc = read(local, job["media"]["format"], settings, source=job["filename"])
    progress("reading", 100.0)
    data = doc.docling or {}
    markdown = doc.markdown
    if settings.caption_model_path is not None:
        progress("captioning", 0.0)
        data = {**data, "caption": captions.caption_file(local, settings.caption_model_path)}
        markdown = f"{markdown.rstrip()}\n\n## Caption\n\n{data['caption']}\n"
        progress("captioning", 100.0)
    outputs: Outputs = {"md": markdown, "json": json.dumps(data, ensure_ascii=False)}
    summary = {
        "format": doc.doc_format,
        "pages": doc.pages,
        "method": doc.method,
        "notes": doc.notes,
        "lines": len(data.get("lines", [])),
        "width": data.get("width"),
        "height": data.get("height"),
        "timings": doc.timings,
    }
    if "caption" in data:
        summary["caption"] = data["caption"]
    return outputs, summary
