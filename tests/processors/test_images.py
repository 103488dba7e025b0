"""Images: each format is known by its content, the words rendered in one come back by OCR with
its EXIF metadata, and a corrupt one is refused with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import Settings
from pipeline.errors import BadInput
from pipeline.kinds import IMAGE
from pipeline.processors import images, no_progress
from pipeline.routing import classify

#: What the rendered image says, line by line.
WORDS = ("Quarterly invoice total", "Remote workers ready")


def render(path: Path, **save: object) -> Path:
    """A white image with ``WORDS`` in black, saved to ``path`` (its suffix says the format)."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (900, 300), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=48)  # Pillow's own font: no system font needed
    for row, line in enumerate(WORDS):
        draw.text((40, 60 + 100 * row), line, fill="black", font=font)
    image.save(path, **save)
    return path


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JPEG with the words and a camera's EXIF tags."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x010F] = "Morag Optics"  # Make
    exif[0x0110] = "Scanner 9"  # Model
    exif[0x0132] = "2024:03:05 10:30:00"  # DateTime
    return render(tmp_path_factory.mktemp("images") / "invoice.jpg", quality=95, exif=exif)


@pytest.fixture
def corrupt_png(tmp_path: Path) -> Path:
    """A PNG signature followed by bytes that are no image."""
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 16)
    return path


@pytest.mark.parametrize(
    ("suffix", "fmt"), [(".png", "png"), (".jpg", "jpeg"), (".tiff", "tiff"), (".webp", "webp")]
)
def test_each_image_format_is_known_by_its_content(tmp_path: Path, suffix: str, fmt: str) -> None:
    path = render(tmp_path / f"scan{suffix}")
    found = classify(path, path.name)
    assert (found.kind, found.format, found.mime, found.notes) == (IMAGE.name, fmt, f"image/{fmt}", [])
    renamed = path.rename(tmp_path / "scan.txt")
    assert classify(renamed, renamed.name).format == fmt  # the content wins, and says so
    assert classify(renamed, renamed.name).notes == [
        f"the name says .txt but the content is {fmt}; the content wins"
    ]


def test_the_words_in_an_image_come_back_with_its_metadata(photo: Path, tmp_path: Path) -> None:
    job = {"task_id": "t1", "kind": IMAGE.name, "filename": "invoice.jpg", "media": {"format": "jpeg"}}
    outputs, summary = images.run(job, photo, tmp_path, Settings(), no_progress, lambda: False)
    markdown = outputs["md"]
    assert markdown.startswith("# invoice.jpg\n")
    for line in WORDS:
        assert line in markdown
    assert "- JPEG, 900 x 300 pixels, RGB" in markdown and "- Make: Morag Optics" in markdown
    data = json.loads(outputs["json"])
    assert data["exif"]["Model"] == "Scanner 9" and data["exif"]["DateTime"] == "2024:03:05 10:30:00"
    assert [line["text"] for line in data["lines"]] == list(WORDS)
    assert all(0.5 < line["confidence"] <= 1 and len(line["box"]) == 4 for line in data["lines"])
    assert summary["method"] == "rapidocr" and summary["lines"] == 2
    assert summary["notes"] == [images.OCR_ONLY_NOTICE]


def test_a_corrupt_image_is_refused_with_its_reason(corrupt_png: Path, tmp_path: Path) -> None:
    assert classify(corrupt_png, corrupt_png.name).kind == IMAGE.name  # its first bytes say PNG
    job = {"task_id": "t1", "kind": IMAGE.name, "filename": "broken.png", "media": {"format": "png"}}
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(BadInput, match="cannot read the PNG image"):
        images.run(job, corrupt_png, work, Settings(), no_progress, lambda: False)
    assert list(work.iterdir()) == []
