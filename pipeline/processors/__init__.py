"""The work itself, free of Dramatiq: media probing and audio extraction, Whisper
transcription, transcript formats, document conversion, web pages and images.

Each long-running function takes an optional ``progress(stage, percent)``
callback and raises ``pipeline.errors`` exceptions for bad input.
"""

from collections.abc import Callable

Progress = Callable[[str, float], None]


def no_progress(stage: str, percent: float) -> None:
    """A progress callback that ignores reports."""
