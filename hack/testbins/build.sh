#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, etcd, kwok, helm 3, helm 4 and versitygw
# (the S3-compatible server of the store tests) from the Go module proxy with the machine's Go. No release downloads
# are reachable here, so everything is compiled.
# Binaries land in ~/.cache/lorafleet/bin/<component>-<version>/ and are built once per machine.
# Prints the bin directory of each component on stdout as NAME=DIR lines at the end (for eval).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC1091
source "$here/versions.env"
cache="${LORAFLEET_CACHE:-$HOME/.cache/lorafleet}"
bin_root="$cache/bin"
work="$cache/build"
mkdir -p "$bin_root" "$work"
export GOFLAGS="-mod=mod"
export GOTOOLCHAIN=local
log() { echo "[testbins $(date +%H:%M:%S)] $*" >&2; }
# One build per machine at a time: a second caller waits here, then finds everything cached.
# (lorafleet.controlplane.binaries takes the same lock itself and sets LORAFLEET_BUILD_LOCK_HELD.)
if [[ -z "${LORAFLEET_BUILD_LOCK_HELD:-}" ]] && command -v flock >/dev/null; then
  exec 9>"$cache/build.lock"
  flock -n 9 || { log "another build is running; waiting for it"; flock 9; }
fi

build_k8s() {
  local out="$bin_root/k8s-$K8S_VERSION"
  if [[ -x "$out/kube-apiserver" && -x "$out/kube-controller-manager" && -x "$out/kube-scheduler" && -x "$out/kubectl" ]]; then
    log "kubernetes $K8S_VERSION: cached in $out"; return
  fi
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local patch="${K8S_VERSION##*.}"
  local staging_version="v0.$minor.$patch"
  local mod="$work/k8s-$K8S_VERSION"
  mkdir -p "$mod" "$out"
  log "kubernetes $K8S_VERSION: resolving staging modules (pinned at $staging_version)"
  local gomod
  gomod="$(cd "$mod" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
  # Staging modules are the requires at v0.0.0 that kubernetes' own go.mod replaces with ./staging/...
  local staging
  staging="$(python3 - "$gomod" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
mods = sorted(set(re.findall(r"^\s*(k8s\.io/[\w.\-/]+)\s+=>\s+\./staging/", text, re.M)))
print("\n".join(mods))
PY
)"
  log "kubernetes $K8S_VERSION: $(echo "$staging" | wc -l) staging modules"
  {
    echo "module lorafleet.io/testbins/k8s"
    echo
    echo "go 1.26.0"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    while read -r m; do [[ -n "$m" ]] && echo "replace $m => $m $staging_version"; done <<<"$staging"
  } >"$mod/go.mod"
  cat >"$mod/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  log "kubernetes $K8S_VERSION: go mod tidy (downloads modules)"
  (cd "$mod" && go mod tidy -e >/dev/null 2>&1 || true; cd "$mod" && go mod download)
  local date; date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  local ld="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ld="$ld -X $pkg.gitCommit=0000000000000000000000000000000000000000 -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done
  log "kubernetes $K8S_VERSION: compiling kube-apiserver, kube-controller-manager, kube-scheduler, kubectl (10-25 min cold on 2 cores)"
  (cd "$mod" && go build -trimpath -ldflags "$ld" -o "$out/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
  log "kubernetes $K8S_VERSION: done"
}

build_etcd() {
  local out="$bin_root/etcd-$ETCD_VERSION"
  if [[ -x "$out/etcd" ]]; then log "etcd $ETCD_VERSION: cached in $out"; return; fi
  local mod="$work/etcd-$ETCD_VERSION"
  mkdir -p "$mod" "$out"
  log "etcd $ETCD_VERSION: wrapper module"
  (cd "$mod" && [[ -f go.mod ]] || (cd "$mod" && go mod init lorafleet.io/testbins/etcd >/dev/null 2>&1))
  (cd "$mod" && go get -tool "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null 2>&1)
  log "etcd $ETCD_VERSION: compiling"
  (cd "$mod" && go build -trimpath -ldflags "-s -w" -o "$out/etcd" go.etcd.io/etcd/server/v3)
  log "etcd $ETCD_VERSION: done"
}

build_plain() {  # name version package
  local name="$1" version="$2" pkg="$3" ld="${4:-}"
  local out="$bin_root/$name-$version"
  if [[ -x "$out/$name" ]]; then log "$name $version: cached in $out"; return; fi
  mkdir -p "$out.tmp"
  log "$name $version: go install $pkg@$version"
  GOBIN="$out.tmp" go install -trimpath -ldflags "-s -w $ld" "$pkg@$version"
  mkdir -p "$out" && mv -f "$out.tmp/$name" "$out/$name" && rmdir "$out.tmp"
  log "$name $version: done"
}

start=$(date +%s)
which="${*:-all}"
[[ "$which" == all || "$which" == *etcd* ]] && build_etcd
[[ "$which" == all || "$which" == *kwok* ]] && build_plain kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok "-X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}"
helm_ldflags() {
  # Helm's default Kubernetes version (for `helm template`, `helm lint` and chart kubeVersion checks) is stamped
  # from the client-go minor it was built with, as its Makefile does; unstamped builds claim v1.20.
  local gomod minor
  gomod="$(cd "$work" && go mod download -json "helm.sh/helm/v3@$HELM_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
  minor="$(sed -n 's#^[[:space:]]*k8s.io/client-go v0\.\([0-9]*\)\..*#\1#p' "$gomod" | head -1)"
  local ld="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    ld="$ld -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=${minor:-36}"
  done
  echo "$ld"
}
[[ "$which" == all || "$which" == *helm* ]] && build_plain helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm "$(helm_ldflags)"
# Helm 4 reads its default Kubernetes version from the client-go it was built with; only its own version is stamped.
[[ "$which" == all || "$which" == *helm4* ]] && build_plain helm "$HELM4_VERSION" helm.sh/helm/v4/cmd/helm \
  "-X helm.sh/helm/v4/internal/version.version=$HELM4_VERSION -X helm.sh/helm/v4/internal/version.metadata="
[[ "$which" == all || "$which" == *k8s* ]] && build_k8s
[[ "$which" == all || "$which" == *versitygw* ]] && build_plain versitygw "$VERSITYGW_VERSION" github.com/versity/versitygw/cmd/versitygw
log "all control-plane binaries ready in $(( $(date +%s) - start ))s"
echo "K8S_BIN=$bin_root/k8s-$K8S_VERSION"
echo "ETCD_BIN=$bin_root/etcd-$ETCD_VERSION"
echo "KWOK_BIN=$bin_root/kwok-$KWOK_VERSION"
echo "HELM_BIN=$bin_root/helm-$HELM_VERSION"
echo "VERSITYGW_BIN=$bin_root/versitygw-$VERSITYGW_VERSION"
echo "HELM4_BIN=$bin_root/helm-$HELM4_VERSION"
