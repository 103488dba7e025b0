"""Hypothesis profiles for the fuzzers: a bounded run by default, a long one on request.

``MORAG_FUZZ_EXAMPLES=N`` multiplies nothing: it sets the number of examples
every fuzz target tries (tests/fuzz/README.md gives the long-run command).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

#: Examples per target in CI; each module lowers it where an example is costly (ffprobe, SFTP).
CI_EXAMPLES = 200

_long = os.environ.get("MORAG_FUZZ_EXAMPLES")
settings.register_profile(
    "fuzz-ci",
    max_examples=CI_EXAMPLES,
    deadline=5000,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "fuzz-long",
    parent=settings.get_profile("fuzz-ci"),
    max_examples=int(_long) if _long else CI_EXAMPLES,
    deadline=None,
)
settings.load_profile("fuzz-long" if _long else "fuzz-ci")


def examples(ci: int) -> int:
    """The examples a target tries: ``ci`` in CI, ``MORAG_FUZZ_EXAMPLES`` in a long run."""
    return int(_long) if _long else ci
