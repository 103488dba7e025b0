"""Prometheus' text exposition format (version 0.0.4): metric families rendered as text.

A family has a name, a type (``gauge``, ``counter``, ``histogram``), a help
line and its samples. Label values are escaped as the format asks; infinite
values are written ``+Inf``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

#: The Content-Type of the text format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = Mapping[str, str]


@dataclass
class Family:
    """One metric family and its samples.

    Parameters:
      name: the metric's name (for a counter, with its ``_total``).
      kind: ``gauge``, ``counter`` or ``histogram``.
      help: one line saying what it measures.
      samples: (name suffix, labels, value) each; the suffix is ``""`` except for
        a histogram's ``_bucket``, ``_sum`` and ``_count``.
    """

    name: str
    kind: str
    help: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, labels: Labels | None = None, suffix: str = "") -> None:
        self.samples.append((suffix, dict(labels or {}), value))

    def add_histogram(
        self, labels: Labels, buckets: Iterable[tuple[float, float]], count: float, total: float
    ) -> None:
        """One histogram series: cumulative (upper bound, count) pairs, then ``+Inf``, sum and count."""
        for bound, cumulative in buckets:
            self.add(cumulative, {**labels, "le": format_value(bound)}, "_bucket")
        self.add(count, {**labels, "le": "+Inf"}, "_bucket")
        self.add(total, labels, "_sum")
        self.add(count, labels, "_count")


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(families: Iterable[Family]) -> str:
    """The families in the text format, each with its HELP and TYPE lines."""
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for suffix, labels, value in family.samples:
            shown = ",".join(f'{key}="{_escape(str(val))}"' for key, val in labels.items())
            name = family.name + suffix
            lines.append(
                f"{name}{{{shown}}} {format_value(value)}" if shown else f"{name} {format_value(value)}"
            )
    return "\n".join(lines) + "\n"
