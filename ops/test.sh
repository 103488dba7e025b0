#!/usr/bin/env bash
# Sets everything up, then runs the linter and the whole test suite against the
# real RabbitMQ, SFTP, faster-whisper and docling. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./ops/setup.sh
.venv/bin/ruff check pipeline tests bench
.venv/bin/ruff format --check pipeline tests bench
# Three test files at a time, each with its own vhost, ports and folders; a file's tests share one
# process, as its module fixtures expect. The run is bound by the CPU, not by waits (on 2 cores both
# stay busy throughout; five files at a time saved 3 of 26 minutes and overloaded the machine).
# The 25 slowest steps, and the 20 test files that took the most CPU (tests/conftest.py), are
# listed at the end: the files to make cheaper first.
exec .venv/bin/pytest -q -ra -n 3 --dist loadfile --durations=25 "$@"
