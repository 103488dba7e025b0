"""Fixtures of the processor tests."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from pipeline.processors import whisper


@pytest.fixture
def no_models_loaded() -> Iterator[None]:
    """A test that starts and ends with no Whisper model loaded in this process."""
    whisper.drop_models()
    yield
    whisper.drop_models()
    gc.collect()
