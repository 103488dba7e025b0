"""The stage timings of a task's run, and the line ``status`` writes of them."""

from __future__ import annotations

import time

from pipeline.timings import Stopwatch, describe, stages


def test_a_stage_entered_twice_adds_up_and_counts_when_it_raises() -> None:
    watch = Stopwatch()
    with watch.stage("manifest"):
        time.sleep(0.01)
    try:
        with watch.stage("manifest"):
            time.sleep(0.01)
            raise OSError("gone")
    except OSError:
        pass
    watch.add("download", 0.25)
    assert watch.timings()["download_s"] == 0.25
    assert 0.02 <= watch.timings()["manifest_s"] < 1.0


def test_stages_come_in_the_order_they_run_and_others_after() -> None:
    timings = {"upload_s": 0.1, "transcribe_s": 0.9, "caption_s": 0.2, "download_s": 0.05, "flag": True}
    assert [name for name, _ in stages(timings)] == ["download", "transcribe", "upload", "caption"]


def test_the_status_line_sums_the_stages_against_the_running_time() -> None:
    timings = {"download_s": 0.05, "decode_s": 0.1, "transcribe_s": 0.85}
    line = "download 0.05 s, decode 0.10 s, transcribe 0.85 s"
    assert describe(timings, 1.25) == f"{line}; 1.00 s of 1.25 s running"
    assert describe(timings) == line
    assert describe({}) == ""
