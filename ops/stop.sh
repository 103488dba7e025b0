#!/usr/bin/env bash
# Stops what ops/demo.sh started.
cd "$(dirname "$0")/.."
# DEMO_RUN_DIR: the folder ops/demo.sh was run with (default .run).
for pidfile in "${DEMO_RUN_DIR:-.run}"/*.pid; do
  [ -e "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
    [ "${1:-}" = "--quiet" ] || echo "stopped $(basename "$pidfile" .pid)"
  fi
  rm -f "$pidfile"
done
