"""Transcript formats."""

from __future__ import annotations

import json

from pipeline.processors.transcripts import FORMATS, Segment, Transcript, Word


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


def spoken() -> Transcript:
    """A detected-language transcript with word timestamps, three words per cue."""
    words = [Word(0.5, 0.9, " One", 0.91), Word(0.9, 1.2, " two", 0.8), Word(1.2, 1.6, " three", 0.7),
             Word(1.6, 2.0, " four.", 0.99)]  # fmt: skip
    return Transcript(
        segments=[
            Segment(0.5, 2.0, "One two three four.", words=words, avg_logprob=-0.2),
            Segment(75.0, 76.0, "Later.", words=[Word(75.0, 76.0, " Later.", 0.5)]),
        ],
        language="en",
        language_probability=0.9731,
        duration=76.4,
        model="tiny.en",
        device="cpu",
        compute_type="int8",
        source="talk.mp4",
        options={"word_timestamps": True, "language": "auto", "max_words_per_cue": 3},
    )


def test_json_holds_the_words_and_what_was_asked() -> None:
    data = json.loads(FORMATS["json"](spoken()))
    assert data["segments"][0]["words"][1] == {"start": 0.9, "end": 1.2, "word": " two", "probability": 0.8}
    assert data["segments"][0]["avg_logprob"] == -0.2
    assert (data["language"], data["language_probability"]) == ("en", 0.9731)
    assert data["options"] == {"word_timestamps": True, "language": "auto", "max_words_per_cue": 3}
    assert Transcript.from_dict(data) == spoken()


def test_subtitles_have_a_cue_per_word_group_never_across_segments() -> None:
    srt = FORMATS["srt"](spoken())
    assert srt == (
        "1\n00:00:00,500 --> 00:00:01,600\nOne two three\n\n"
        "2\n00:00:01,600 --> 00:00:02,000\nfour.\n\n"
        "3\n00:01:15,000 --> 00:01:16,000\nLater.\n"
    )
    vtt = FORMATS["vtt"](spoken())
    assert "00:00:00.500 --> 00:00:01.600\nOne two three\n" in vtt and vtt.count("-->") == 3


def test_markdown_says_how_the_language_was_found() -> None:
    assert "- Language: en (detected, probability 0.97)\n" in FORMATS["md"](spoken())
    assert "- Language: en (given)\n" in FORMATS["md"](sample())
    translated = Transcript(**{**vars(sample()), "task": "translate"})
    assert "- Language: en (given), translated to English\n" in FORMATS["md"](translated)


def test_morag_markdown_follows_moRAGs_audio_converter_layout() -> None:
    assert FORMATS["morag"](spoken()) == (
        "# Audio Transcription: talk.mp4\n"
        "\n"
        "## Metadata\n"
        "\n"
        "- **Duration**: 00:01:16\n"
        "- **Language**: English (en)\n"
        "- **Language Probability**: 0.97\n"
        "- **Task**: transcribe\n"
        "- **Model**: tiny.en\n"
        "- **Num Speakers**: 1\n"
        "- **Speakers**: SPEAKER_00\n"
        "- **Word Count**: 5\n"
        "\n"
        "## Detailed Transcript\n"
        "\n"
        "[00:00][SPEAKER_00] One two three four.\n"
        "[01:15][SPEAKER_00] Later.\n"
    )
    # Minutes go on past the hour, as in MoRAG's lines.
    assert "\n[61:01][SPEAKER_00] An hour later.\n" in FORMATS["morag"](sample())


def test_a_transcript_written_before_the_options_still_reads() -> None:
    old = {"segments": [{"start": 0.0, "end": 1.0, "text": "Hi."}], "language": "en", "duration": 1.0,
           "model": "tiny.en", "device": "cpu", "compute_type": "int8", "timings": {}, "source": "a.mp3",
           "text": "Hi."}  # fmt: skip
    t = Transcript.from_dict(old)
    assert (t.language_probability, t.task, t.segments[0].words) == (None, "transcribe", None)
