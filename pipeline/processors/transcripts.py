"""A transcript and its output formats: JSON, SRT, VTT, TXT, Markdown and MoRAG's Markdown.

Each format carries what the transcription was asked for (``Transcript.options``,
see ``speech_options``): JSON holds each segment's words with their times and
probabilities when word timestamps were asked; SRT and VTT then have one cue per
group of at most ``max_words_per_cue`` words (never across segments), else one
cue per segment; the Markdown formats name the language (detected, with its
probability, or given) and a translation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.processors.speech_options import (
    DEFAULT_WORDS_PER_CUE,
    LANGUAGES,
    TRANSCRIBE_TASK,
    TRANSLATE_TASK,
)

#: MoRAG's label for the one speaker: there is no diarization, every line is this speaker's.
SPEAKER = "SPEAKER_00"


@dataclass
class Word:
    """One word as Whisper heard it; ``word`` keeps its leading space, so the words of a segment
    joined give its text back (also in languages written without spaces)."""

    start: float
    end: float
    word: str
    probability: float


@dataclass
class Segment:
    """A stretch of speech. ``words`` is None unless word timestamps were asked; the decoding
    facts (``avg_logprob`` ...) are None where unknown."""

    start: float
    end: float
    text: str
    words: list[Word] | None = None
    avg_logprob: float | None = None
    compression_ratio: float | None = None
    no_speech_prob: float | None = None
    temperature: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"start": self.start, "end": self.end, "text": self.text}
        for name in ("avg_logprob", "compression_ratio", "no_speech_prob", "temperature"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        if self.words is not None:
            data["words"] = [vars(w) for w in self.words]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Segment:
        words = data.get("words")
        return cls(**{**data, "words": None if words is None else [Word(**w) for w in words]})


@dataclass
class Transcript:
    """What a transcription produced, and how.

    ``language_probability`` is set when the language was detected (None when it was
    given); ``task`` is transcribe or translate; ``speech_duration`` is the seconds
    of speech the VAD kept (None without VAD); ``options`` are the transcription
    options as the task asked them (``SpeechOptions.to_options``); ``inference`` is how it
    decoded: ``batched``, ``batch_size`` and ``cpu_threads`` (``whisper.Inference``).
    """

    segments: list[Segment]
    language: str
    duration: float
    model: str
    device: str
    compute_type: str
    timings: dict[str, float] = field(default_factory=dict)
    source: str = ""
    language_probability: float | None = None
    task: str = TRANSCRIBE_TASK
    speech_duration: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    inference: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return " ".join(s.text.strip() for s in self.segments if s.text.strip())

    @property
    def words(self) -> list[Word]:
        """Every word of every segment (none unless word timestamps were asked)."""
        return [w for s in self.segments for w in (s.words or [])]

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "language": self.language,
            "language_probability": self.language_probability,
            "task": self.task,
            "duration": self.duration,
            "speech_duration": self.speech_duration,
            "model": self.model,
            "device": self.device,
            "compute_type": self.compute_type,
            "options": self.options,
            "inference": self.inference,
            "timings": self.timings,
            "text": self.text,
            "segments": [s.to_dict() for s in self.segments],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Transcript:
        fields = {k: v for k, v in data.items() if k != "text"}
        fields["segments"] = [Segment.from_dict(s) for s in data["segments"]]
        return cls(**fields)


def _shifted(segment: Segment, offset: float, limit: float) -> Segment:
    """``segment`` with its times and its words' times moved ``offset`` seconds later (to the ms),
    none past ``limit``, the end of its chunk (Whisper may place an end a little beyond it)."""

    def at(t: float) -> float:
        return round(min(t, limit) + offset, 3)

    words = None if segment.words is None else [
        Word(at(w.start), at(w.end), w.word, w.probability) for w in segment.words
    ]  # fmt: skip
    return replace(segment, start=at(segment.start), end=at(segment.end), words=words)


def stitch(parts: list[tuple[float, Transcript]], source: str = "") -> Transcript:
    """One transcript of a recording from the transcripts of its chunks, each with the second of
    the recording its chunk starts at, in order.

    The chunks were cut in silences (``pipeline.processors.cuts``), so the
    transcript is their segments joined, each segment and word shifted by its
    chunk's start: no word falls on a cut. The facts of the whole are the first
    chunk's (language, model, device), its duration the chunks' summed, its
    timings each summed over the chunks.
    """
    if not parts:
        raise ValueError("no chunks to stitch")
    first = parts[0][1]
    segments = [_shifted(s, offset, t.duration) for offset, t in parts for s in t.segments]
    timings: dict[str, float] = {}
    for _, t in parts:
        for name, seconds in t.timings.items():
            timings[name] = round(timings.get(name, 0.0) + seconds, 3)
    speech = [t.speech_duration for _, t in parts]
    return Transcript(
        segments=segments,
        language=first.language,
        duration=round(parts[-1][0] + parts[-1][1].duration, 3),
        model=first.model,
        device=", ".join(dict.fromkeys(t.device for _, t in parts)),
        compute_type=first.compute_type,
        timings=timings,
        source=source or first.source,
        language_probability=first.language_probability,
        task=first.task,
        speech_duration=None if None in speech else round(sum(speech), 3),  # type: ignore[arg-type]
        options=first.options,
        inference=first.inference,
    )


def _clock(seconds: float, sep: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{sep}{millis:03d}"


def cues(t: Transcript) -> list[tuple[float, float, str]]:
    """The subtitle cues of a transcript: (start, end, text).

    With words, each segment's words in groups of at most ``max_words_per_cue``
    (its option, else ``DEFAULT_WORDS_PER_CUE``); a segment without words is one cue.
    """
    size = int(t.options.get("max_words_per_cue") or DEFAULT_WORDS_PER_CUE)
    found = []
    for s in t.segments:
        if not s.words:
            found.append((s.start, s.end, s.text.strip()))
            continue
        for i in range(0, len(s.words), size):
            group = s.words[i : i + size]
            found.append((group[0].start, group[-1].end, "".join(w.word for w in group).strip()))
    return [cue for cue in found if cue[2]]


def to_json(t: Transcript) -> str:
    return json.dumps(t.to_dict(), indent=2, ensure_ascii=False) + "\n"


def to_srt(t: Transcript) -> str:
    blocks = [
        f"{i}\n{_clock(start, ',')} --> {_clock(end, ',')}\n{text}\n"
        for i, (start, end, text) in enumerate(cues(t), 1)
    ]
    return "\n".join(blocks)


def to_vtt(t: Transcript) -> str:
    blocks = [f"{_clock(start, '.')} --> {_clock(end, '.')}\n{text}\n" for start, end, text in cues(t)]
    return "WEBVTT\n\n" + "\n".join(blocks)


def to_txt(t: Transcript) -> str:
    return t.text + "\n"


def describe_language(language: str, probability: float | None, task: str = TRANSCRIBE_TASK) -> str:
    """'en (detected, probability 0.98)', 'de (given)', with ', translated to English' after a
    translation."""
    how = "given" if probability is None else f"detected, probability {probability:.2f}"
    said = f"{language} ({how})"
    return f"{said}, translated to English" if task == "translate" else said


def to_markdown(t: Transcript) -> str:
    """Markdown: a header of facts, then timestamped paragraphs."""
    title = t.source or "Transcript"
    lines = [
        f"# {title}",
        "",
        f"- Language: {describe_language(t.language, t.language_probability, t.task)}",
        f"- Duration: {_clock(t.duration, '.')[:-4]}",
        f"- Model: {t.model} on {t.device}",
        "",
        "## Transcript",
        "",
    ]
    for s in t.segments:
        lines.append(f"**[{_clock(s.start, '.')[:-4]}]** {s.text.strip()}")
        lines.append("")
    return "\n".join(lines)


def _minutes_seconds(seconds: float) -> str:
    """MoRAG's line timestamp: whole minutes (past 59 too) and seconds, ``[MM:SS]``."""
    whole = max(0, int(seconds))
    return f"[{whole // 60:02d}:{whole % 60:02d}]"


def to_morag(t: Transcript) -> str:
    """Markdown in the layout of MoRAG's audio converter, which MoRAG ingests as it is.

    ``# Audio Transcription: <file>``, a ``## Metadata`` list of ``- **Name**: value``
    (duration as HH:MM:SS), then ``## Detailed Transcript`` with one line per
    segment, ``[MM:SS][SPEAKER_00] text``. There is no diarization: every line is
    SPEAKER_00's.
    """
    metadata = {
        "Duration": _clock(t.duration, ".")[:-4],
        "Language": LANGUAGES.get(t.language, t.language).title() + f" ({t.language})",
        "Language Probability": None if t.language_probability is None else f"{t.language_probability:.2f}",
        "Task": "translate (to English)" if t.task == TRANSLATE_TASK else TRANSCRIBE_TASK,
        "Model": t.model,
        "Num Speakers": 1,
        "Speakers": SPEAKER,
        "Word Count": len(t.text.split()),
    }
    lines = [f"# Audio Transcription: {t.source or 'audio'}", "", "## Metadata", ""]
    lines += [f"- **{name}**: {value}" for name, value in metadata.items() if value is not None]
    lines += ["", "## Detailed Transcript", ""]
    lines += [f"{_minutes_seconds(s.start)}[{SPEAKER}] {s.text.strip()}" for s in t.segments
              if s.text.strip()]  # fmt: skip
    return "\n".join(lines) + "\n"


#: Every format a transcription produces, by name; the name is the output's extension
#: except where ``pipeline.outputs.EXTENSIONS`` says otherwise (``morag``: ``.morag.md``).
FORMATS = {
    "json": to_json,
    "srt": to_srt,
    "vtt": to_vtt,
    "txt": to_txt,
    "md": to_markdown,
    "morag": to_morag,
}
