#!/usr/bin/env bash
# Prints the path of a Prometheus server binary, installing Debian's `prometheus` package first if none is found.
#
# Why Debian's package: the machines have no network except package registries, and the worker's metrics test must
# scrape /metrics with a real Prometheus server, not a parser of our own. The package's postinst may try to start a
# service; there is no init system here, so that is harmless (policy-rc.d forbids it anyway).
set -euo pipefail

find_prometheus() {
  if command -v prometheus >/dev/null 2>&1; then
    command -v prometheus
    return 0
  fi
  if [ -x /usr/bin/prometheus ]; then
    echo /usr/bin/prometheus
    return 0
  fi
  return 1
}

if path=$(find_prometheus); then
  echo "$path"
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  echo "hack/prometheus.sh: prometheus is not installed and we are not root to apt-get it" >&2
  exit 1
fi

# Keep services from starting inside a container without an init system.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  created_policy=1
fi
trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends prometheus >&2

path=$(find_prometheus) || { echo "hack/prometheus.sh: prometheus still not found after apt-get" >&2; exit 1; }
echo "$path"
