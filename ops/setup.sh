#!/usr/bin/env bash
# Sets up morag-pipeline on a Debian machine: system packages, RabbitMQ (installed
# and started when none is reachable, with its management plugin), PostgreSQL
# (installed and started when none is reachable, for the PostgreSQL task-store
# tests: user postgres, trust auth on 127.0.0.1), and a virtual
# environment in .venv with the package, its extras and the torch pins.
# Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m==> %s\033[0m\n' "$*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# System packages: Python, media tools, speech synthesis for samples, OpenSSH for
# the SFTP interop tests, RabbitMQ.
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have python3 || need+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
have ffmpeg || need+=(ffmpeg)
have espeak-ng || need+=(espeak-ng)
have sftp || need+=(openssh-client)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
have curl || need+=(curl)
# The deployment-shapes tests run a worker box in its own network namespace (ip netns).
have ip || need+=(iproute2)
# The monitoring tests: a real Prometheus (with promtool) scrapes /metrics; `watch` runs under tmux.
have prometheus && have promtool || need+=(prometheus)
have tmux || need+=(tmux)
# The dashboard's browser tests drive Debian's chromium (Playwright never downloads one).
have chromium || need+=(chromium)

broker_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! broker_up && ! have rabbitmq-server && [ ! -x /usr/sbin/rabbitmq-server ]; then
  need+=(rabbitmq-server)
fi
postgres_up() { (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }
if ! postgres_up && ! compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null; then
  need+=(postgresql)
fi
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi

# RabbitMQ: use the one listening on 5672, else start the local one.
if ! broker_up; then
  log "starting RabbitMQ"
  as_root rabbitmq-server -detached
  for _ in $(seq 60); do broker_up && break; sleep 1; done
  broker_up || { echo "RabbitMQ did not start; see /var/log/rabbitmq" >&2; exit 1; }
fi
# PostgreSQL: use the one listening on 5432, else start the local cluster (created
# when missing) with trust authentication on 127.0.0.1 for the tests.
if ! postgres_up; then
  log "starting PostgreSQL"
  pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  pg_data=/var/lib/postgresql/morag
  if [ ! -s "$pg_data/PG_VERSION" ]; then
    as_root mkdir -p "$pg_data"
    as_root chown postgres:postgres "$pg_data"
    as_root su postgres -c "$pg_bin/initdb -D $pg_data -A trust -U postgres" >/dev/null
  fi
  as_root mkdir -p /var/run/postgresql
  as_root chown postgres:postgres /var/run/postgresql
  as_root su postgres -c "$pg_bin/pg_ctl -D $pg_data -l $pg_data/server.log -o '-c listen_addresses=127.0.0.1' start" >/dev/null
  for _ in $(seq 60); do postgres_up && break; sleep 1; done
  postgres_up || { echo "PostgreSQL did not start; see $pg_data/server.log" >&2; exit 1; }
fi
mgmt_up() { curl -sf -u guest:guest http://127.0.0.1:15672/api/overview >/dev/null; }
if ! mgmt_up && have rabbitmq-plugins; then
  log "enabling the RabbitMQ management plugin (port 15672)"
  as_root rabbitmq-plugins enable rabbitmq_management >/dev/null
  for _ in $(seq 30); do mgmt_up && break; sleep 1; done
fi

# Python environment. The stamp holds a hash of setup.cfg: edit it and the
# next run reinstalls.
stamp=.venv/.morag-installed
want=$(sha256sum setup.cfg pyproject.toml | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  python3 -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing morag-pipeline with its extras (torch and docling are large: several minutes)"
  .venv/bin/pip install -q --upgrade pip
  # bench: the baselines the benchmarks compare with (Celery, for bench/broker_throughput.py).
  .venv/bin/pip install -q -e '.[server,worker,documents,dev,bench]'
  echo "$want" > "$stamp"
fi
# Bytecode for the project's own modules: an editable install writes none, and where
# PYTHONDONTWRITEBYTECODE is set (as in many images) every worker start would compile them
# again, a tenth of a second (bench/broker_throughput.py). Quick when nothing changed.
.venv/bin/python -m compileall -q pipeline bench
log "ready: $(.venv/bin/morag-pipeline --version)"
