#!/usr/bin/env bash
# The README's main command: brings up a local LoRA Fleet (control plane with KWOK GPU nodes, operator, CPU worker
# processes with a small model, sample resources). Installs what it needs on a fresh machine first.
# `bash hack/up.sh down` tears it down.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
V="$(bash hack/venv.sh)"
bash hack/testbins/build.sh >/dev/null
if [[ "${1:-up}" == "down" ]]; then shift; exec "$V/bin/lorafleet" down "$@"; fi
[[ "${1:-}" == "up" ]] && shift
exec "$V/bin/lorafleet" up "$@"
