"""The processing kinds: one record each, and the only place a kind is defined.

A kind says everything the rest of the pipeline needs to handle its tasks:
the actor whose messages carry them, the queues that may run them (the
preferred first) and whether a GPU task may fall back to a CPU worker, its
cost estimate, the runner that turns a job into outputs, the formats of its
outputs, the content it accepts and the setting that bounds its input.

Routing, submission, the actors, the worker's job, the outputs check, the
sweep and the CLI read these records; none of them names a kind itself
(``tests/unit/test_kinds.py`` holds them to that). A new kind is its record
here, its processor, and one line in content sniffing (``pipeline.routing``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.processors.transcripts import FORMATS as TRANSCRIPT_FORMATS

if TYPE_CHECKING:
    from pipeline.config import Settings
    from pipeline.processors import Progress

MIB = 1024 * 1024

#: The output format of a file a stage hands on: the server takes it as the task's next input
#: and the task goes on as the kind its content is (a web URL that answered with a recording).
HANDOFF = "download"

#: What a runner returns: each output format's content (a path for a large file) and a summary.
Outputs = dict[str, "str | bytes | Path"]


class Runner(Protocol):
    """Turns one job into its outputs: ``(outputs by format, result summary)``.

    Parameters:
      job: the task message's job (``pipeline.task_message.build_job``).
      local: the downloaded input file; None for a kind whose input is not a file (a URL).
      folder: a private temporary folder, removed afterwards.
      settings: the worker's settings.
      progress: ``progress(stage, percent)``.
      should_stop: polled between steps; True when the task was canceled.
    """

    def __call__(
        self,
        job: dict[str, Any],
        local: Path | None,
        folder: Path,
        settings: Settings,
        progress: Progress,
        should_stop: Callable[[], bool],
    ) -> tuple[Outputs, dict[str, Any]]: ...


class Facts(Protocol):
    """What an estimate reads of a classified input (``pipeline.routing.Classification``)."""

    size: int
    duration: float | None
    pages: int | None


Estimate = Callable[[Facts, "Settings"], dict[str, float]]


@dataclass(frozen=True)
class Kind:
    """One kind of task.

    Parameters:
      name: the task's kind, as stored, shown and filtered on (``morag-pipeline tasks --kind``).
      actor: the Dramatiq actor whose messages carry its jobs.
      queues: the queues that may run it, the preferred first (``gpu``, ``cpu``).
      fallback: whether a task that prefers the GPU may run on, or be moved to, a CPU worker.
      estimate: expected seconds on each queue it may run on (``{"gpu_s": …, "cpu_s": …}``).
      runner: ``module:function`` of its ``Runner``, imported when a worker first runs one.
      formats: the formats of its outputs.
      accepts: the content it takes, in the words of refusals and of the docs.
      size_limit: the setting (in MiB) that bounds its input.
      working: what its progress and a cancellation call the work (``transcribing``).
      hands_off: whether its outputs may include a ``HANDOFF`` file that goes on as a new stage.
      takes_url: whether its input is a URL a worker fetches, not a file (a stage may also hand
        its URL on to such a kind: a page that embeds a video goes on as a media URL).
      chunks_as: for a stage that cuts a long input (its result's ``chunks``), the kind each
        chunk is a task of; the server stitches their outputs into the task's (``pipeline.chunks``).
    """

    name: str
    actor: str
    queues: tuple[str, ...]
    fallback: bool
    estimate: Estimate
    runner: str
    formats: tuple[str, ...]
    accepts: str
    size_limit: str
    working: str
    hands_off: bool = False
    takes_url: bool = False
    chunks_as: str | None = None

    @property
    def prefers_gpu(self) -> bool:
        return self.queues[0] == "gpu"

    @property
    def outputs(self) -> tuple[str, ...]:
        """Every format a completion of this kind may report: its formats, and the hand-off."""
        return (*self.formats, HANDOFF) if self.hands_off else self.formats

    def max_bytes(self, settings: Settings) -> int:
        """The largest input of this kind ``settings`` allow."""
        return int(getattr(settings, self.size_limit)) * MIB

    def too_large(self, size: int, settings: Settings) -> str | None:
        """Why an input of ``size`` bytes is refused for this kind; None when it is not."""
        limit = getattr(settings, self.size_limit)
        if size <= limit * MIB:
            return None
        return f"larger than the {limit} MiB allowed for {self.accepts} (MORAG_{self.size_limit.upper()})"

    def run(self) -> Runner:
        """The runner itself."""
        module, _, name = self.runner.partition(":")
        return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def _per_second_of_media(found: Facts, settings: Settings) -> dict[str, float]:
    seconds = found.duration or 0.0
    return {
        "gpu_s": round(2.0 + seconds * settings.gpu_realtime_factor, 1),
        "cpu_s": round(1.0 + seconds * settings.cpu_realtime_factor, 1),
    }


def _per_cut_search(found: Facts, settings: Settings) -> dict[str, float]:
    # Decoding and the VAD take about a hundredth of the media's length on a CPU.
    return {"cpu_s": round(2.0 + (found.duration or 0.0) * 0.02, 1)}


def _per_page(found: Facts, settings: Settings) -> dict[str, float]:
    pages = found.pages or max(1, found.size // 200_000)
    return {"cpu_s": round(2.0 + pages * settings.cpu_seconds_per_page, 1)}


def _per_fetch(found: Facts, settings: Settings) -> dict[str, float]:
    # A page may take its whole fetch timeout to arrive; extraction is quick.
    return {"cpu_s": round(2.0 + settings.fetch_timeout_s, 1)}


def _per_media_fetch(found: Facts, settings: Settings) -> dict[str, float]:
    # The download may take its whole media timeout; the transcription is the next stage's.
    return {"cpu_s": round(2.0 + settings.media_timeout_s, 1)}


def _per_image(found: Facts, settings: Settings) -> dict[str, float]:
    return {
        "gpu_s": round(2.0 + settings.gpu_seconds_per_image, 1),
        "cpu_s": round(2.0 + settings.cpu_seconds_per_image, 1),
    }


TRANSCRIBE = Kind(
    name="transcribe",
    actor="transcribe",
    queues=("gpu", "cpu"),
    fallback=True,
    estimate=_per_second_of_media,
    runner="pipeline.jobs:transcribe",
    formats=tuple(TRANSCRIPT_FORMATS),
    accepts="audio and video",
    size_limit="max_upload_mb",
    working="transcribing",
)
CONVERT = Kind(
    name="convert",
    actor="convert_document",
    queues=("cpu",),
    fallback=False,
    estimate=_per_page,
    runner="pipeline.jobs:convert",
    formats=("md", "json"),
    accepts="documents",
    size_limit="max_document_mb",
    working="converting",
)
WEB = Kind(
    name="web",
    actor="fetch_url",
    queues=("cpu",),
    fallback=False,
    estimate=_per_fetch,
    runner="pipeline.processors.web:run",
    formats=("md", "json"),
    accepts="web pages",
    size_limit="fetch_max_mb",
    working="fetching",
    hands_off=True,
    takes_url=True,
)
MEDIA_URL = Kind(
    name="media_url",
    actor="fetch_media",
    queues=("cpu",),
    fallback=False,
    estimate=_per_media_fetch,
    runner="pipeline.processors.media_urls:run",
    formats=(),  # the download is handed on, and transcribed as the task's next stage
    accepts="media URLs",
    size_limit="max_upload_mb",
    working="downloading",
    hands_off=True,
    takes_url=True,
)
IMAGE = Kind(
    name="image",
    actor="read_image",
    queues=("gpu", "cpu"),
    fallback=True,
    estimate=_per_image,
    runner="pipeline.processors.images:run",
    formats=("md", "json"),
    accepts="images",
    size_limit="max_image_mb",
    working="reading",
)

SPLIT = Kind(
    name="split",
    actor="split_media",
    queues=("cpu",),
    fallback=False,
    estimate=_per_cut_search,
    runner="pipeline.processors.cuts:run",
    formats=(),  # its result says where to cut; each chunk is a transcription of its own
    accepts="audio and video",
    size_limit="max_upload_mb",
    working="finding cuts",
    chunks_as=TRANSCRIBE.name,
)

#: Every kind, by name.
KINDS: Mapping[str, Kind] = {kind.name: kind for kind in (TRANSCRIBE, CONVERT, WEB, MEDIA_URL, IMAGE, SPLIT)}


def first_stage(kind: str, duration: float | None, settings: Settings) -> str:
    """The kind a task of ``kind`` starts as: a recording longer than ``MORAG_SPLIT_OVER_S``
    (when set) is first cut into chunks, each transcribed on its own."""
    long = settings.split_over_s > 0 and (duration or 0.0) > settings.split_over_s
    return SPLIT.name if long and kind == SPLIT.chunks_as else kind


def kind_of(name: str) -> Kind:
    """The kind called ``name``; KeyError naming the known kinds for any other."""
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"no kind {name!r}; the kinds are {', '.join(KINDS)}") from None


def runs_on(queue: str) -> list[Kind]:
    """The kinds a worker of ``queue`` runs: those that may run there."""
    return [kind for kind in KINDS.values() if queue in kind.queues]


def actors_on(queue: str) -> frozenset[str]:
    """The actors a worker of ``queue`` registers: a message moves only where its actor is."""
    return frozenset(kind.actor for kind in runs_on(queue))
