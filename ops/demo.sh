#!/usr/bin/env bash
# The main job on a sample: sets everything up, starts the server, one GPU-queue
# worker and one CPU-queue worker in the background, submits samples/talk.mp4
# and prints its transcript. Stop everything with ops/stop.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
./ops/setup.sh

run=.run
mkdir -p "$run"
export MORAG_DATA_DIR="${MORAG_DATA_DIR:-$PWD/$run/data}"
export MORAG_LOG_JSON="${MORAG_LOG_JSON:-false}"
./ops/stop.sh --quiet

start() {  # name, command...
  local name=$1; shift
  nohup "$@" >"$run/$name.log" 2>&1 &
  echo $! >"$run/$name.pid"
}
start server .venv/bin/morag-pipeline server
start gpu-worker .venv/bin/dramatiq pipeline.actors.gpu --queues gpu --processes 1 --threads 1
start cpu-worker .venv/bin/dramatiq pipeline.actors.cpu --queues cpu --processes 1 --threads 2

url=$(.venv/bin/python -c 'from pipeline.config import get_settings; print(get_settings().server_url)')
for _ in $(seq 60); do curl -sf "$url/healthz" >/dev/null && break; sleep 1; done
curl -sf "$url/healthz" >/dev/null || { echo "server did not start; see $run/server.log" >&2; exit 1; }
# Wait until the GPU worker consumes, so the sample goes to the gpu queue.
for _ in $(seq 60); do
  n=$(curl -sf -u guest:guest http://127.0.0.1:15672/api/queues/%2F/gpu | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin).get("consumers", 0))' 2>/dev/null || echo 0)
  [ "$n" -ge 1 ] && break; sleep 1
done

echo
.venv/bin/morag-pipeline submit samples/talk.mp4
cat <<TXT

Running in the background (logs in $run/):
  API and OpenAPI docs   $url/docs
  RabbitMQ management    http://127.0.0.1:15672  (guest/guest; queues gpu, cpu, control)
Try:
  .venv/bin/morag-pipeline submit samples/report.html
  .venv/bin/morag-pipeline tasks
Stop everything:
  ops/stop.sh
TXT
