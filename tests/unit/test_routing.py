"""Classification by content and the choice of queue."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.config import Settings
from pipeline.errors import BadInput, UnsupportedType
from pipeline.routing import choose_route, classify
from tests.conftest import make_silent_video


@pytest.mark.parametrize(
    ("name", "kind", "fmt"),
    [
        ("talk.mp4", "transcribe", "video"),
        ("speech.mp3", "transcribe", "audio"),
        ("report.html", "convert", "html"),
    ],
)
def test_samples_are_recognised(samples: Path, name: str, kind: str, fmt: str) -> None:
    found = classify(samples / name, name)
    assert (found.kind, found.format) == (kind, fmt)
    assert found.notes == []


def test_media_duration_is_measured(samples: Path) -> None:
    assert classify(samples / "speech.mp3", "speech.mp3").duration == pytest.approx(9.2, abs=0.3)


@pytest.mark.parametrize("fmt", ["docx", "pptx", "xlsx", "md", "pdf", "html"])
def test_documents_by_content(office_files: dict[str, Path], fmt: str) -> None:
    found = classify(office_files[fmt], office_files[fmt].name)
    assert (found.kind, found.format) == ("convert", fmt)


def test_pdf_pages_counted(office_files: dict[str, Path]) -> None:
    assert classify(office_files["pdf"], "report.pdf").pages == 1


def test_video_renamed_txt_is_still_video(samples: Path, tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    shutil.copy(samples / "talk.mp4", path)
    found = classify(path, "notes.txt")
    assert found.format == "video"
    assert found.notes == ["the name says .txt but the content is video; the content wins"]


def test_docx_renamed_pdf_is_docx(office_files: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "budget.pdf"
    shutil.copy(office_files["docx"], path)
    assert classify(path, "budget.pdf").format == "docx"


@pytest.mark.parametrize(
    ("name", "content", "error", "message"),
    [
        ("clip.mp4", b"just text\n", UnsupportedType, "the content is plain text, but the name says .mp4"),
        ("empty.mp3", b"", BadInput, "the file is empty"),
        ("data.bin", bytes(range(256)) * 40, UnsupportedType, "unsupported content"),
        ("cut.mp3", b"ID3\x03\x00\x00\x00" + b"\xff" * 50, BadInput, "corrupt or truncated media"),
        ("archive.docx", b"PK\x03\x04" + b"\x00" * 100, BadInput, "damaged ZIP container"),
        ("broken.pdf", b"%PDF-1.4\nnot really\n", BadInput, "the PDF is damaged"),
    ],
)
def test_refused_with_reason(tmp_path: Path, name: str, content: bytes, error: type, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(error, match=message):
        classify(path, name)


def test_zip_that_is_not_office(tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "photos.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a.txt", "hello")
    with pytest.raises(UnsupportedType, match="not a DOCX, PPTX or XLSX"):
        classify(path, "photos.zip")


def test_video_without_audio_refused(tmp_path: Path) -> None:
    path = make_silent_video(tmp_path / "silent.mp4")
    with pytest.raises(BadInput, match="no audio track"):
        classify(path, "silent.mp4")


@pytest.fixture
def video(samples: Path):
    return classify(samples / "talk.mp4", "talk.mp4")


def test_route_prefers_gpu_when_a_worker_is_there(video) -> None:
    route = choose_route(video, Settings(), gpu_workers=2)
    assert route.queue == "gpu"
    assert "2 GPU worker(s) connected" in route.reasons[0]
    assert route.estimates["gpu_s"] < route.estimates["cpu_s"]


def test_route_falls_back_to_cpu_without_gpu_worker(video) -> None:
    route = choose_route(video, Settings(), gpu_workers=0)
    assert route.queue == "cpu"
    assert route.reasons[0].startswith("no GPU worker is connected: falling back to CPU")


def test_route_require_waits_for_gpu_and_never_stays_on_cpu(video) -> None:
    assert choose_route(video, Settings(), gpu="require", gpu_workers=0).queue == "gpu"
    assert choose_route(video, Settings(), gpu="never", gpu_workers=3).queue == "cpu"


def test_documents_go_to_cpu(samples: Path) -> None:
    html = classify(samples / "report.html", "report.html")
    route = choose_route(html, Settings(), gpu_workers=5)
    assert route.queue == "cpu"


@pytest.mark.parametrize(("name", "value"), [("low", 0), ("normal", 3), ("high", 6), ("urgent", 9)])
def test_priorities_map_to_rabbitmq(video, name: str, value: int) -> None:
    assert choose_route(video, Settings(), priority=name).broker_priority == value


def test_unknown_priority_and_gpu_preference(video) -> None:
    with pytest.raises(BadInput, match="priority must be one of low, normal, high, urgent"):
        choose_route(video, Settings(), priority="asap")
    with pytest.raises(BadInput, match="gpu must be one of"):
        choose_route(video, Settings(), gpu="maybe")


def test_time_limit_grows_with_duration_and_stays_below_consumer_timeout(video) -> None:
    settings = Settings()
    short = choose_route(video, settings)
    video.duration = 10 * 3600
    long = choose_route(video, settings)
    assert short.time_limit_s < long.time_limit_s == settings.max_time_limit_s < 30 * 60
