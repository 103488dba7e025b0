"""The long soak: ``python -m tests.soak.run --minutes 30 --tasks 1000``.

Runs ``tests/soak/test_soak.py`` with the plan given here (docs/soak.md), prints the count,
and exits with pytest's exit code (0: every task ended, none stuck or doubled).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.soak.run", description="The soak of tests/soak, run longer (docs/soak.md)."
    )
    parser.add_argument("--minutes", type=float, default=30, help="minutes of faults and submits (30)")
    parser.add_argument("--tasks", type=int, default=1000, help="files submitted over those minutes (1000)")
    parser.add_argument("--seed", type=int, help="replay a run's choices (default: a fresh seed, printed)")
    parser.add_argument(
        "--drain-minutes", type=float, help="time the tasks get to end (default: minutes/2, >= 10)"
    )
    parser.add_argument("--report", type=Path, default=Path("soak-report.txt"), help="where the count goes")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.tasks <= 0:
        parser.error("--minutes and --tasks must be positive")
    os.environ.update(
        SOAK_MINUTES=str(args.minutes),
        SOAK_TASKS=str(args.tasks),
        SOAK_DRAIN_MINUTES=str(args.drain_minutes or max(10.0, args.minutes / 2)),
        SOAK_REPORT=str(args.report.resolve()),
    )
    if args.seed is not None:
        os.environ["SOAK_SEED"] = str(args.seed)
    test = Path(__file__).with_name("test_soak.py")
    return int(pytest.main(["-q", "-s", "-p", "no:cacheprovider", f"{test}::test_soak"]))


if __name__ == "__main__":
    sys.exit(main())
