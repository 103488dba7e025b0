"""Loaded into a test's GPU worker (``Stack.start_worker(modules=...)``): the first transcription
runs out of GPU memory, as CTranslate2 says it on CUDA; every later one is the real faster-whisper.

The test machines have no GPU, so the error is raised where ``whisper.transcribe`` would raise it;
everything after it (the slots, GpuFallback, Retries, the server) is the product's own.
"""

from __future__ import annotations

import threading
from typing import Any

from pipeline.errors import GpuError
from pipeline.processors import whisper

_real = whisper.transcribe
_lock = threading.Lock()
_failed = [False]


def transcribe_out_of_memory_once(*args: Any, **kwargs: Any) -> Any:
    with _lock:
        first, _failed[0] = not _failed[0], True
    if first:
        raise GpuError("transcription failed on the GPU: CUDA failed with error out of memory")
    return _real(*args, **kwargs)


whisper.transcribe = transcribe_out_of_memory_once  # type: ignore[assignment]
