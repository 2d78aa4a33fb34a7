#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the tests need on a fresh machine, then runs them.
#   venv (cached by pyproject hash) → control-plane binaries (cached by version) → Debian prometheus →
#   container images (cached by content) → ruff → pytest
# Prints the time of each stage. Extra arguments go to pytest (e.g. `bash hack/test.sh tests/worker -k api`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
t0=$(date +%s)
stage_start=$t0
stage() {
  local now; now=$(date +%s)
  echo "==> [$(date -u +%H:%M:%S)] stage '$1' took $((now - stage_start))s (total $((now - t0))s)"
  stage_start=$now
}

echo "==> [$(date -u +%H:%M:%S)] python environment"
V="$(bash hack/venv.sh)"
stage venv

echo "==> [$(date -u +%H:%M:%S)] control-plane binaries (kube-apiserver, etcd, kwok, helm, ...)"
bash hack/testbins/build.sh >/dev/null
stage control-plane-binaries

echo "==> [$(date -u +%H:%M:%S)] prometheus"
if [[ -f hack/prometheus.sh ]]; then bash hack/prometheus.sh >/dev/null; fi
stage prometheus

# The full suite only (a chosen subset builds them when it selects tests/foundation/test_images.py, which starts them).
if (($# == 0)); then
  echo "==> [$(date -u +%H:%M:%S)] container images (mmdebstrap + buildah, cached by content)"
  LORAFLEET_PYTHON="$V/bin/python" bash hack/images.sh build
  stage images
fi

echo "==> [$(date -u +%H:%M:%S)] ruff"
"$V/bin/ruff" check .
stage ruff

echo "==> [$(date -u +%H:%M:%S)] pytest"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
set +e
# -P: never put the checkout on sys.path, where operator/ would shadow the standard library's operator.
"$V/bin/python" -P -m pytest -p no:cacheprovider --durations=25 "${@:-tests}"
rc=$?
set -e
stage pytest
if [[ $rc -eq 5 ]]; then echo "pytest collected no tests"; exit 1; fi
exit $rc
