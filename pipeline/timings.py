"""The wall time of each stage of a job, as a task's ``result["timings"]`` reports it.

A worker times every stage of a task it runs with one ``Stopwatch``: the
download of the input, the reports it sends between stages, the uploads of
the outputs, the checks for a finished manifest. The runner of the task's kind reports its own
stages (``probe_s``, ``decode_s``, ``load_s``, ``transcribe_s``, ``render_s``
for a transcription); both land in the same ``timings``, one key per stage,
in seconds, named ``<stage>_s``.

``describe`` writes them as the one line ``morag-pipeline status`` shows:
the stages in the order they run, then their sum against the task's running
time (the rest is what no stage accounts for: the grant, the manifest's
upload, the completion report and its verification by the server).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

#: The stages in the order a worker runs them; a stage not listed comes after, in its own order.
#: (Named by their keys: a stage is not a kind, even where it shares a kind's name.)
ORDER = tuple(
    key.removesuffix("_s")
    for key in (
        "download_s", "fetch_s", "probe_s", "decode_s", "load_s", "transcribe_s", "convert_s",
        "extract_s", "render_s", "upload_s", "manifest_s", "report_s",
    )
)  # fmt: skip


class Stopwatch:
    """Seconds spent in each named stage, added up over every time the stage is entered."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as part of stage ``name``, whether it returns or raises."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def timings(self) -> dict[str, float]:
        """The stages as ``result["timings"]`` holds them: ``{"<stage>_s": seconds}``, to the ms."""
        return {f"{name}_s": round(seconds, 3) for name, seconds in self.seconds.items()}


def stages(timings: Mapping[str, Any]) -> list[tuple[str, float]]:
    """The ``<stage>_s`` numbers of ``timings`` as (stage, seconds), in the order they run."""
    found = {
        key[:-2]: float(value)
        for key, value in timings.items()
        if key.endswith("_s") and isinstance(value, int | float) and not isinstance(value, bool)
    }
    ordered = [name for name in ORDER if name in found]
    return [(name, found[name]) for name in ordered + [n for n in found if n not in ORDER]]


def describe(timings: Mapping[str, Any], running_s: float | None = None) -> str:
    """``download 0.05 s, probe 0.03 s, ...; 1.20 s of 1.31 s running`` (the running part only
    when ``running_s`` is known); empty when there are no timings."""
    found = stages(timings)
    if not found:
        return ""
    line = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in found)
    if running_s is not None:
        line += f"; {sum(s for _, s in found):.2f} s of {running_s:.2f} s running"
    return line
