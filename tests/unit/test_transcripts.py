"""Transcript formats."""

from __future__ import annotations

import json

from pipeline.processors.transcripts import FORMATS, Segment, Transcript


def sample() -> Transcript:
    return Transcript(
        segments=[Segment(0.0, 2.5, " Hello there."), Segment(3661.25, 3662.0, "An hour later.")],
        language="en",
        duration=3662.0,
        model="tiny.en",
        device="cpu",
        compute_type="int8",
        source="talk.mp4",
    )


def test_srt_and_vtt_timestamps() -> None:
    t = sample()
    srt = FORMATS["srt"](t)
    assert srt.startswith(
        "1\n00:00:00,000 --> 00:00:02,500\nHello there.\n\n2\n01:01:01,250 --> 01:01:02,000\n"
    )
    vtt = FORMATS["vtt"](t)
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:02.500\nHello there.\n")
    assert "01:01:01.250 --> 01:01:02.000\nAn hour later." in vtt


def test_text_json_and_markdown() -> None:
    t = sample()
    assert FORMATS["txt"](t) == "Hello there. An hour later.\n"
    data = json.loads(FORMATS["json"](t))
    assert data["segments"][1] == {"start": 3661.25, "end": 3662.0, "text": "An hour later."}
    assert data["language"] == "en" and data["model"] == "tiny.en" and data["text"].startswith("Hello")
    assert Transcript.from_dict(data).segments == t.segments
    md = FORMATS["md"](t)
    assert md.startswith("# talk.mp4\n")
    assert "**[01:01:01]** An hour later." in md
