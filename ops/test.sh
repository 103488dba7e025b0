#!/usr/bin/env bash
# Sets everything up, then runs the linter and the whole test suite against the
# real RabbitMQ, SFTP, faster-whisper and docling. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./ops/setup.sh
.venv/bin/ruff check pipeline tests bench
.venv/bin/ruff format --check pipeline tests bench
exec .venv/bin/pytest -q -ra "$@"
