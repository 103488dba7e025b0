#!/usr/bin/env bash
# Measures what each role costs to install (docs/deploy.md quotes its output): for each
# extra named (default: none, server, worker, documents), the wheels it downloads, then a
# clean virtual environment installing the package's wheel with that extra from those
# wheels only (no network: the time is unpacking and byte-compiling, not downloading),
# and the size of that environment less an empty one's. The install is timed on the wall
# clock and in CPU seconds (user + system), which depend less on what else the machine runs.
#   ops/measure-install.sh [ROLE...]      ROLE: core (no extra), server, worker, documents
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/morag-measure.XXXXXX")
trap 'rm -rf "$work"' EXIT
roles=("$@")
[ ${#roles[@]} -gt 0 ] || roles=(core server worker documents)

$py -m venv "$work/empty"
"$work/empty/bin/pip" install -q --upgrade pip
empty_mb=$(du -sm "$work/empty" | cut -f1)
"$work/empty/bin/pip" wheel -q --no-deps -w "$work/dist" . >/dev/null
wheel=$(echo "$work"/dist/morag_pipeline-*.whl)

printf '%-10s %12s %12s %10s %10s\n' role download_MB installed_MB wall_s cpu_s
for role in "${roles[@]}"; do
  spec=$wheel
  [ "$role" = core ] || spec="$wheel[$role]"
  "$work/empty/bin/pip" download -q -d "$work/wheels-$role" "$spec" >/dev/null
  download_mb=$(du -sm "$work/wheels-$role" | cut -f1)
  $py -m venv "$work/venv-$role"
  "$work/venv-$role/bin/pip" install -q --upgrade pip
  TIMEFORMAT='%R %U %S'
  times=$( { time "$work/venv-$role/bin/pip" install -q --no-index --find-links "$work/wheels-$role" \
    "$spec" >/dev/null 2>&1; } 2>&1 )
  read -r wall user sys <<<"$times"
  installed_mb=$(( $(du -sm "$work/venv-$role" | cut -f1) - empty_mb ))
  printf '%-10s %12s %12s %10.1f %10.1f\n' "$role" "$download_mb" "$installed_mb" "$wall" \
    "$(echo "$user + $sys" | bc)"
  rm -rf "$work/venv-$role" "$work/wheels-$role"
done
