#!/usr/bin/env bash
# Sets everything up, then runs the linter and the whole test suite against the
# real RabbitMQ, SFTP, faster-whisper and docling. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./ops/setup.sh
.venv/bin/ruff check pipeline tests bench
.venv/bin/ruff format --check pipeline tests bench
# Three test files at a time (most tests wait, not compute; each has its own vhost, ports and
# folders); a file's tests share one process, as its module fixtures expect.
# The 25 slowest steps are listed at the end, to keep the run short.
exec .venv/bin/pytest -q -ra -n 3 --dist loadfile --durations=25 "$@"
