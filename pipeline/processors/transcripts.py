"""A transcript and its output formats: JSON, SRT, VTT, TXT and Markdown."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Segment:
    start: float
    end: float
    text: str


@dataclass
class Transcript:
    """What a transcription produced, and how."""

    segments: list[Segment]
    language: str
    duration: float
    model: str
    device: str
    compute_type: str
    timings: dict[str, float] = field(default_factory=dict)
    source: str = ""

    @property
    def text(self) -> str:
        return " ".join(s.text.strip() for s in self.segments if s.text.strip())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["text"] = self.text
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Transcript:
        fields = {k: v for k, v in data.items() if k != "text"}
        fields["segments"] = [Segment(**s) for s in data["segments"]]
        return cls(**fields)


def _clock(seconds: float, sep: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{sep}{millis:03d}"


def to_json(t: Transcript) -> str:
    return json.dumps(t.to_dict(), indent=2, ensure_ascii=False) + "\n"


def to_srt(t: Transcript) -> str:
    blocks = [
        f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text.strip()}\n"
        for i, s in enumerate(t.segments, 1)
    ]
    return "\n".join(blocks)


def to_vtt(t: Transcript) -> str:
    cues = [f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text.strip()}\n" for s in t.segments]
    return "WEBVTT\n\n" + "\n".join(cues)


def to_txt(t: Transcript) -> str:
    return t.text + "\n"


def to_markdown(t: Transcript) -> str:
    """Markdown for MoRAG ingestion: a header of facts, then timestamped paragraphs."""
    title = t.source or "Transcript"
    lines = [
        f"# {title}",
        "",
        f"- Language: {t.language}",
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


FORMATS = {
    "json": to_json,
    "srt": to_srt,
    "vtt": to_vtt,
    "txt": to_txt,
    "md": to_markdown,
}
