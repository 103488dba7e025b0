#!/usr/bin/env bash
# The main job on a sample: sets everything up, starts the server, one GPU-queue
# worker and one CPU-queue worker in the background, submits samples/talk.mp4
# and prints its transcript. Stop everything with ops/stop.sh.
# A test runs it with its own folder (DEMO_RUN_DIR, default .run), DEMO_SKIP_SETUP=1 and its
# own MORAG_ settings (broker URL and vhost, ports, data folder) in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${DEMO_SKIP_SETUP:-}" ] || ./ops/setup.sh

run=${DEMO_RUN_DIR:-.run}
mkdir -p "$run"
here=$(cd "$run" && pwd)
export MORAG_DATA_DIR="${MORAG_DATA_DIR:-$here/data}"
export MORAG_LOG_JSON="${MORAG_LOG_JSON:-false}"
./ops/stop.sh --quiet
mp=.venv/bin/morag-pipeline

# The server's secret and an admin API key for the CLI, made once (mode 0600).
umask 077
[ -s "$run/secret" ] || .venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(48))' >"$run/secret"
export MORAG_SECRET_KEY="$(cat "$run/secret")"
[ -s "$run/api-key" ] || $mp apikey create --name demo --role admin >"$run/api-key"
export MORAG_API_KEY="$(cat "$run/api-key")"
# The GPU worker is enrolled as a remote box would be: a token, files over SFTP
# only, its own data directory. The CPU worker shares the server's disk.
$mp token issue --worker demo-gpu --capability gpu --env-file "$run/gpu-worker.env" >/dev/null
mkdir -p "$run/gpu-worker"
umask 022

start() {  # name, command...
  local name=$1; shift
  nohup "$@" >"$run/$name.log" 2>&1 &
  echo $! >"$run/$name.pid"
}
start server .venv/bin/morag-pipeline server
# Wait for the server (and its SFTP server) before the GPU worker connects.
url=$(.venv/bin/python -c 'from pipeline.config import get_settings; print(get_settings().server_url)')
for _ in $(seq 60); do curl -sf "$url/healthz" >/dev/null && break; sleep 1; done
curl -sf "$url/healthz" >/dev/null || { echo "server did not start; see $run/server.log" >&2; exit 1; }
# The enrolled worker reads morag.env in its working directory, and knows no server secret.
cp "$run/gpu-worker.env" "$run/gpu-worker/morag.env"
MORAG_DATA_DIR="$here/gpu-worker" start gpu-worker env -C "$run/gpu-worker" -u MORAG_SECRET_KEY \
  -u MORAG_API_KEY "$PWD/.venv/bin/dramatiq" pipeline.actors.gpu --queues gpu --processes 1 --threads 2
MORAG_FILE_ACCESS=shared MORAG_WORKER_NAME=demo-cpu \
  start cpu-worker .venv/bin/dramatiq pipeline.actors.cpu --queues cpu --processes 1 --threads 2

# Wait until the GPU worker consumes, so the sample goes to the gpu queue.
vhost=$(.venv/bin/python -c 'import urllib.parse as u; from pipeline.config import get_settings
print(u.urlsplit(get_settings().broker_url.get_secret_value()).path.lstrip("/") or "%2F")')
for _ in $(seq 60); do
  n=$(curl -sf -u guest:guest "http://127.0.0.1:15672/api/queues/$vhost/gpu" | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin).get("consumers", 0))' 2>/dev/null || echo 0)
  [ "$n" -ge 1 ] && break; sleep 1
done

echo
$mp submit samples/talk.mp4
cat <<TXT

Running in the background (logs in $run/):
  API and OpenAPI docs   $url/docs
  RabbitMQ management    http://127.0.0.1:15672  (guest/guest; queues gpu, cpu, control)
Try (with MORAG_API_KEY=\$(cat $run/api-key) and MORAG_DATA_DIR=$MORAG_DATA_DIR):
  $mp submit samples/report.html
  $mp tasks
  $mp workers
Stop everything:
  ops/stop.sh
TXT
