"""Transcription slots: how many transcriptions a worker process runs on its model at once.

A GPU-queue worker holds one message more than it has slots (``WorkerSizing``):
while the model transcribes one task, another thread downloads and decodes the
next, then waits here for a slot. Only the model's work (loading and decoding,
``whisper.transcribe``) holds a slot; download, decode, render, upload and the
reports run outside it, so the model never waits on I/O.

The number of slots is decided at boot (``decide``): ``MORAG_WHISPER_CONCURRENCY``
when set, else one on CPU, and on CUDA as many as the free VRAM holds by a
per-model estimate (``VRAM_MB``), keeping headroom. A CUDA out-of-memory error
lowers it by one (``Slots.out_of_memory``), not below one.

Free of Dramatiq: the middleware (``pipeline.middleware.worker_sizing``) sizes
the process's ``slots`` at boot; the transcription runner (``pipeline.jobs``)
takes a slot around ``whisper.transcribe``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

from pipeline.identity import worker_id
from pipeline.logs import get_logger

logger = get_logger(__name__)

#: Peak VRAM (MiB) of one transcription with the model at float16, beam 5, CUDA context
#: included; a slot is counted at this whole figure, weights included, although the slots of
#: a process share one model: the estimate errs toward fewer slots, and an out-of-memory
#: error lowers them further. Sources: faster-whisper's README benchmark (large-v2, fp16,
#: beam 5, 13 min of audio on an RTX 3070 Ti: 4525 MB; its int8: 2926 MB), and OpenAI
#: Whisper's README table of required VRAM (tiny ~1 GB, base ~1 GB, small ~2 GB, medium
#: ~5 GB, large ~10 GB, for PyTorch; CTranslate2's float16 needs about half of that for the
#: larger models, as the large-v2 figure shows). large-v3 has the same size as large-v2;
#: turbo (large-v3-turbo) has 4 decoder layers instead of 32. Not measured here: the test
#: machines have no GPU.
VRAM_MB: dict[str, int] = {
    "tiny": 1024,
    "base": 1024,
    "small": 2048,
    "medium": 3584,
    "large": 4608,
    "turbo": 3072,
}
#: The estimate of a model not in ``VRAM_MB`` (a folder, a fine-tune): a large one.
UNKNOWN_MODEL_MB = VRAM_MB["large"]
#: VRAM kept free beside the slots: the larger of this and ``HEADROOM_SHARE`` of the free VRAM
#: (other processes' growth, cuDNN workspaces, fragmentation).
HEADROOM_MB = 1024
HEADROOM_SHARE = 0.1


def model_vram_mb(model: str) -> int:
    """The estimated peak VRAM (MiB) of one transcription with ``model`` at float16."""
    name = model.rstrip("/").rsplit("/", 1)[-1].lower()  # "Systran/faster-whisper-large-v3" too
    name = name.removeprefix("faster-whisper-").removeprefix("distil-").removesuffix(".en")
    if "turbo" in name:
        return VRAM_MB["turbo"]
    for size in ("large", "medium", "small", "base", "tiny"):
        if name.startswith(size):
            return VRAM_MB[size]
    return UNKNOWN_MODEL_MB


@dataclass(frozen=True)
class Decision:
    """How many slots a process runs, and why (logged at boot)."""

    slots: int
    reason: str


def decide(
    *,
    configured: int,
    device: str,
    threads: int,
    model: str,
    free_vram_mb: int | None = None,
) -> Decision:
    """The number of slots of a process with ``threads`` worker threads.

    ``configured`` (``MORAG_WHISPER_CONCURRENCY``) above 0 is taken as it is; 0 decides: one
    on ``cpu`` (CTranslate2 already uses every core for one transcription), and on ``cuda``
    as many as ``free_vram_mb`` holds at ``model_vram_mb(model)`` each after the headroom
    (one when the free VRAM is unknown). Always at least one and at most ``threads - 1``, so
    that one thread is left to prepare the next task.
    """
    most = max(1, threads - 1)
    if configured > 0:
        slots, reason = configured, f"MORAG_WHISPER_CONCURRENCY={configured}"
    elif device != "cuda":
        slots, reason = 1, f"one on {device}"
    elif free_vram_mb is None:
        slots, reason = 1, "one: the free VRAM is unknown"
    else:
        each = model_vram_mb(model)
        headroom = max(HEADROOM_MB, int(free_vram_mb * HEADROOM_SHARE))
        slots = (free_vram_mb - headroom) // each
        reason = f"{free_vram_mb} MiB VRAM free, {headroom} MiB kept, about {each} MiB per {model}"
    if slots > most:
        slots, reason = most, f"{reason}; at most threads - 1 = {most}"
    if slots < 1:
        slots, reason = 1, f"{reason}; at least 1"
    return Decision(slots, reason)


class Slots:
    """A counting semaphore whose size can be lowered while it is in use.

    ``held`` takes a slot for a block (waiting while every slot is taken) and
    remembers, per thread, how many slots there were when it took one, so that
    ``out_of_memory`` lowers the count once per size, however many transcriptions
    ran out of memory together. Safe to use from several threads.
    """

    def __init__(self, size: int = 1) -> None:
        if size < 1:
            raise ValueError(f"a process needs at least one slot, not {size}")
        self._size = size
        self._used = 0
        self._changed = threading.Condition()
        self._local = threading.local()
        #: What a thread waiting for a slot is inside of (a worker stops its task's time limit:
        #: ``pipeline.middleware.time_limit``); by default nothing.
        self.waiting: Callable[[], AbstractContextManager[None]] = nullcontext

    @property
    def size(self) -> int:
        return self._size

    @property
    def in_use(self) -> int:
        return self._used

    def resize(self, size: int) -> None:
        """Set the number of slots (boot); slots in use above it are given back as they end."""
        if size < 1:
            raise ValueError(f"a process needs at least one slot, not {size}")
        with self._changed:
            self._size = size
            self._changed.notify_all()

    def take(
        self,
        should_stop: Callable[[], bool] | None = None,
        *,
        on_wait: Callable[[], None] | None = None,
        poll_s: float = 0.5,
    ) -> bool:
        """Wait for a free slot (inside ``waiting``) and take it: True.

        ``on_wait`` is called once when every slot is taken, before the wait and outside the
        slots' lock (it may report over the network). ``should_stop`` is asked every ``poll_s``
        seconds of the wait; when it says so, no slot is taken: False."""
        if on_wait is not None:
            with self._changed:
                busy = self._used >= self._size
            if busy:
                on_wait()
        with self._changed:
            if self._used >= self._size:
                with self.waiting():
                    while not self._changed.wait_for(lambda: self._used < self._size, poll_s):
                        if should_stop is not None and should_stop():
                            return False
            self._used += 1
            self._local.size = self._size
            return True

    def give(self) -> None:
        """Give a slot back (from any thread: a warm-up takes one at boot and gives it back from its own)."""
        with self._changed:
            self._used = max(0, self._used - 1)
            self._changed.notify()

    @contextmanager
    def held(self) -> Iterator[None]:
        """A slot for the block."""
        self.take()
        try:
            yield
        finally:
            self.give()

    def out_of_memory(self) -> bool:
        """The model of this thread's last slot ran out of memory: one slot fewer than it had.

        True when it had more than one (the task should be tried again, on the same queue,
        with less running beside it); False at one slot (nothing left to lower: the GPU
        fallback moves the task).
        """
        had = getattr(self._local, "size", self._size)
        if had <= 1:
            return False
        with self._changed:
            lowered = max(1, min(self._size, had - 1))
            changed = lowered != self._size
            self._size = lowered
        if changed:
            logger.warning(
                "GPU out of memory: one transcription slot fewer",
                extra={"worker": worker_id(), "slots": lowered, "had": had},
            )
        return True

    def describe(self) -> dict[str, int]:
        """``{"slots": size, "in_use": taken}``, as a heartbeat carries it."""
        with self._changed:
            return {"slots": self._size, "in_use": self._used}


#: The slots of this process, sized at worker boot.
slots = Slots(1)
