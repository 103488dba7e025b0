"""ffprobe and ffmpeg never hold a task forever: a hung one is killed at its timeout."""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from pathlib import Path

import pytest
from dramatiq.middleware import TimeLimitExceeded

from pipeline.errors import BadInput
from pipeline.processors import media
from tests.conftest import wait_for


def running(marker: str) -> list[int]:
    """Process ids whose command line mentions ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and entry.name != str(os.getpid()):
            found.append(int(entry.name))
    return found


@pytest.fixture
def stalled(tmp_path: Path) -> Path:
    """A named pipe nobody writes to: a reader that opens it waits forever."""
    path = tmp_path / "stalled-input.mp4"
    os.mkfifo(path)
    return path


def test_a_hung_ffprobe_is_killed_and_the_file_refused(stalled: Path) -> None:
    with pytest.raises(
        BadInput, match=r"ffprobe did not finish reading the file within 1s: the file stalls it"
    ):
        media.probe(stalled, timeout_s=1)
    assert running(str(stalled)) == []


def test_a_hung_ffmpeg_is_killed_and_the_file_refused(stalled: Path, tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=r"cannot decode audio: ffmpeg did not finish within 1s"):
        media.extract_audio(stalled, tmp_path / "audio.wav", duration=9.0, timeout_s=1)
    assert running(str(stalled)) == []


def test_the_extraction_timeout_grows_with_the_media() -> None:
    clip, three_hours = media.extract_timeout_s(10.0), media.extract_timeout_s(3 * 3600.0)
    assert media.EXTRACT_BASE_S <= clip < three_hours
    assert three_hours == pytest.approx(media.EXTRACT_BASE_S + 3 * 3600 * media.EXTRACT_S_PER_MEDIA_S)


def test_a_healthy_file_extracts_within_its_bound(samples: Path, tmp_path: Path) -> None:
    audio = media.extract_audio(samples / "speech.mp3", tmp_path / "audio.wav")
    assert audio.stat().st_size > 16_000 * 2 * 8  # about 9 s of 16 kHz 16-bit mono


def test_a_task_time_limit_reaches_a_thread_waiting_on_a_process_and_kills_it(tmp_path: Path) -> None:
    # Dramatiq's TimeLimit raises TimeLimitExceeded in the worker thread the way this test does.
    marker = str(tmp_path / "waiting-marker")
    raised: list[BaseException] = []
    started = threading.Event()

    def wait_on_a_long_process() -> None:
        started.set()
        try:
            media.run_bounded([sys.executable, "-c", "import time; time.sleep(600)", marker], timeout_s=600)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=wait_on_a_long_process)
    thread.start()
    assert started.wait(10)
    wait_for("the process started", lambda: running(marker), 10)
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread.ident), ctypes.py_object(TimeLimitExceeded)
    )
    thread.join(30)
    assert not thread.is_alive()
    assert [type(exc) for exc in raised] == [TimeLimitExceeded]
    assert running(marker) == []
