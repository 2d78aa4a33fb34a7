#!/usr/bin/env bash
# Builds the operator and worker OCI images without a Docker daemon (docs/images.md):
#   a Debian root filesystem from Debian packages (mmdebstrap) -> the pinned dependencies (docker/*-requirements.txt)
#   and this checkout's wheel installed into /opt/lorafleet by the image's own Python -> one OCI layer (buildah).
# docker/*.Dockerfile describe the same images for users with Docker (tests/foundation/test_docker.py compares them).
#
#   bash hack/images.sh [build] [operator] [worker]   build (default: both); one JSON line per image on stdout
#   bash hack/images.sh spec NAME                     the recipe of NAME as JSON (what the tests compare)
#   bash hack/images.sh lock                          regenerate docker/*-requirements.txt from pyproject.toml
#
# Everything lives under $LORAFLEET_IMAGES_DIR (default ~/.cache/lorafleet/images): root filesystems keyed by their
# package list, the image storage (vfs driver), one image per name keyed by the hash of everything it is made of.
# A second build of unchanged inputs only rebuilds the wheel (seconds) and finds the image by its content tag.
# Tools: mmdebstrap and buildah (installed with apt-get when missing and running as root), uv and a Python with
# pip/setuptools ($LORAFLEET_PYTHON, default python3; uv from $LORAFLEET_UV, next to that Python, or on PATH).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
images="${LORAFLEET_IMAGES_DIR:-${LORAFLEET_CACHE:-$HOME/.cache/lorafleet}/images}"

# ---- the recipe (docker/*.Dockerfile must say the same; `spec` prints it) -------------------------------------------
SUITE=bookworm
DEBIAN_IMAGE="debian:bookworm-slim" # what the Dockerfiles start FROM: minbase + the dpkg excludes below
MIRRORS=(
  "deb ${LORAFLEET_DEBIAN_MIRROR:-http://deb.debian.org/debian} $SUITE main"
  "deb ${LORAFLEET_DEBIAN_MIRROR:-http://deb.debian.org/debian} $SUITE-updates main"
  "deb ${LORAFLEET_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security} $SUITE-security main"
)
# The slim image's dpkg filter (Debian's docker images ship the same in /etc/dpkg/dpkg.cfg.d/docker).
DPKG_EXCLUDES=(
  "path-exclude=/usr/share/doc/*" "path-include=/usr/share/doc/*/copyright" "path-exclude=/usr/share/man/*"
  "path-exclude=/usr/share/info/*" "path-exclude=/usr/share/locale/*" "path-include=/usr/share/locale/locale.alias"
  "path-exclude=/usr/share/lintian/*" "path-exclude=/usr/share/linda/*"
)
declare -A PACKAGES=(
  [operator]="python3 ca-certificates"
  # Triton compiles its launcher at first use on a GPU: a C compiler and Python's headers.
  [worker]="python3 ca-certificates gcc libc6-dev libpython3.11-dev"
)
VENV=/opt/lorafleet
UID_GID=65532:65532 # runAsUser/runAsGroup of manifests/ and the chart (restricted Pod Security)
ADD_USER="groupadd --gid 65532 lorafleet && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin lorafleet"
ENTRYPOINT='["lorafleet"]'
declare -A CMD=([operator]='["operator", "--all-namespaces", "--peering=lorafleet"]' [worker]='["worker"]')
declare -A PORTS=([operator]="8080 8081" [worker]="8000")
declare -A VOLUMES=([operator]="" [worker]="/cache /var/lib/lorafleet")
BASE_ENV="PATH=$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1"
declare -A ENVS=([operator]="$BASE_ENV" [worker]="$BASE_ENV HF_HOME=/cache/huggingface TRITON_CACHE_DIR=/cache/triton")
declare -A IMPORT_CHECK=([operator]="lorafleet.operator.main" [worker]="lorafleet.worker.main")
# The operator never imports the ML stack (tests/foundation/test_docker.py checks), so its image gets only these.
OPERATOR_DEPS="kopf kubernetes ortools prometheus-client pydantic httpx pyyaml"
REGISTRY="${LORAFLEET_IMAGE_REGISTRY:-ghcr.io/lorafleet}"
SOURCE_URL="https://github.com/lorafleet/lorafleet"

log() { echo "[images $(date -u +%H:%M:%S)] $*" >&2; }
die() { echo "hack/images.sh: $*" >&2; exit 1; }
version() { sed -n 's/^version = "\(.*\)"/\1/p' "$root/pyproject.toml" | head -1; }
requirements() { echo "$root/docker/$1-requirements.txt"; }
known() { [[ -n "${PACKAGES[$1]+x}" ]] || die "unknown image '$1' (operator, worker)"; }

spec() {
  known "$1"
  python3 -I - "$1" "$SUITE" "$DEBIAN_IMAGE" "${PACKAGES[$1]}" "$VENV" "$UID_GID" "$ADD_USER" "$ENTRYPOINT" \
    "${CMD[$1]}" "${PORTS[$1]}" "${VOLUMES[$1]}" "${ENVS[$1]}" "docker/$1-requirements.txt" "$SOURCE_URL" \
    "$(version)" "${DPKG_EXCLUDES[*]}" "$([[ $1 == operator ]] && echo "$OPERATOR_DEPS" || echo '*')" <<'PY'
import json, sys
(name, suite, base, pkgs, venv, user, add_user, entry, cmd, ports, vols, env, req, src, ver, excl, deps) = sys.argv[1:]
print(json.dumps({
    "name": name, "suite": suite, "base_image": base, "packages": pkgs.split(), "venv": venv, "user": user,
    "add_user": add_user, "entrypoint": json.loads(entry), "cmd": json.loads(cmd), "ports": ports.split(),
    "volumes": vols.split(), "env": dict(e.split("=", 1) for e in env.split()), "requirements": req,
    "pyproject_dependencies": deps.split(),
    "dpkg_excludes": excl.split(),
    "labels": {"org.opencontainers.image.source": src, "org.opencontainers.image.version": ver,
               "org.opencontainers.image.revision": None, "org.opencontainers.image.licenses": "Apache-2.0",
               "org.opencontainers.image.title": f"lorafleet-{name}"},
}, indent=1))
PY
}

# ---- tools ----------------------------------------------------------------------------------------------------------
ensure_tools() {
  local missing=()
  command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
  command -v buildah >/dev/null || missing+=(buildah)
  if ((${#missing[@]})); then
    [[ $(id -u) -eq 0 ]] || die "needs ${missing[*]} (Debian packages): sudo apt-get install -y ${missing[*]}"
    log "installing ${missing[*]} (Debian packages)"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
  fi
  PY="${LORAFLEET_PYTHON:-python3}"
  UV="${LORAFLEET_UV:-}"
  if [[ -z "$UV" ]]; then
    UV="$(dirname "$(command -v "$PY")")/uv"
    [[ -x "$UV" ]] || UV="$(command -v uv || true)"
  fi
  [[ -n "$UV" && -x "$UV" ]] || die "needs uv (pip install uv, or set LORAFLEET_UV)"
  # vfs + chroot: no overlay mounts, no OCI runtime, no daemon; works inside an unprivileged-looking sandbox as root.
  B=(buildah --root "$images/storage" --runroot "$images/run" --storage-driver vfs)
}

# ---- lock files -----------------------------------------------------------------------------------------------------
lock() {
  ensure_tools
  local tmp; tmp="$(mktemp -d)"
  python3 -I - "$root/pyproject.toml" "$OPERATOR_DEPS" "$tmp" <<'PY'
import re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
wanted = sys.argv[2].split()
name = lambda d: re.split(r"[=<>!~ ;\[]", d, maxsplit=1)[0].lower()
open(f"{sys.argv[3]}/worker.in", "w").write("\n".join(deps) + "\n")
operator = [d for d in deps if name(d) in wanted]
assert sorted(map(name, operator)) == sorted(wanted), f"pyproject lacks one of {wanted}"
open(f"{sys.argv[3]}/operator.in", "w").write("\n".join(operator) + "\n")
PY
  # The images' interpreter: Debian bookworm's python3 (3.11) on glibc 2.36.
  local target=(--python-version 3.11 --python-platform x86_64-manylinux_2_36 --generate-hashes --no-header --no-annotate)
  for name in operator worker; do
    local out; out="$(requirements "$name")"
    {
      echo "# Generated by \`bash hack/images.sh lock\` from pyproject.toml (do not edit): every package of the $name"
      echo "# image, pinned with hashes, installed with --no-deps --require-hashes (hack/images.sh, docker/$name.Dockerfile)."
      (cd "$tmp" && "$UV" pip compile -q "${target[@]}" "$name.in")
      if [[ $name == worker ]]; then
        echo "# s3:// sources: hack/s3-requirements.txt (without their dependency declarations, see there)"
        (cd "$tmp" && "$UV" pip compile -q "${target[@]}" --no-deps "$root/hack/s3-requirements.txt")
      fi
    } >"$out.tmp"
    mv "$out.tmp" "$out"
    log "wrote ${out#"$root/"} ($(grep -c '^[a-z0-9]' "$out") packages)"
  done
  rm -rf "$tmp"
}

# ---- build ----------------------------------------------------------------------------------------------------------
sha() { sha256sum | cut -c1-16; }

# The wheel from the files the Dockerfiles COPY (a copy, so the checkout gets no build/ folder); its key hashes the
# wheel's entries, not the zip (which carries timestamps).
build_wheel() {
  local src="$work/src"
  mkdir -p "$src" "$work/wheel"
  cp -r "$root/pyproject.toml" "$root/setup.py" "$root/README.md" "$root/lorafleet" "$root/operator" "$root/worker" "$src/"
  find "$src" -name __pycache__ -prune -exec rm -rf {} +
  (cd "$work" && "$PY" -m pip wheel -q --no-deps --no-build-isolation --wheel-dir "$work/wheel" "$src" >&2)
  WHEEL="$(ls "$work"/wheel/lorafleet-*.whl)"
  WHEEL_KEY="$(python3 -I -c '
import hashlib, sys, zipfile
z = zipfile.ZipFile(sys.argv[1]); h = hashlib.sha256()
for n in sorted(z.namelist()): h.update(n.encode() + b"\0" + z.read(n))
print(h.hexdigest()[:16])' "$WHEEL")"
}

rootfs_key() {
  { echo "$SUITE"; printf '%s\n' "${MIRRORS[@]}" "${DPKG_EXCLUDES[@]}"; echo "${PACKAGES[$1]}"; } | sha
}

# A Debian root filesystem as a tarball, cached by its package list (delete it to pick up Debian updates).
rootfs() {
  local tar; tar="$images/rootfs/$1-$(rootfs_key "$1").tar"
  if [[ ! -f "$tar" ]]; then
    mkdir -p "$images/rootfs"
    rm -f "$images/rootfs/$1"-*.tar
    log "$1: mmdebstrap $SUITE minbase + ${PACKAGES[$1]}"
    local opts=(--format=tar --variant=minbase --include="${PACKAGES[$1]// /,}" --aptopt='APT::Install-Recommends "false"'
      --aptopt='Acquire::Retries "3"')
    for x in "${DPKG_EXCLUDES[@]}"; do opts+=(--dpkgopt="$x"); done
    mmdebstrap --quiet "${opts[@]}" "$SUITE" "$tar.tmp" "${MIRRORS[@]}" >&2
    mv "$tar.tmp" "$tar"
  fi
  echo "$tar"
}

# Everything the image is made of: the recipe, the steps that apply it, the root filesystem, the wheel, the lock.
image_key() {
  { spec "$1"; declare -f build_one; echo "$(rootfs_key "$1") $WHEEL_KEY"; sha256sum <"$(requirements "$1")"; } | sha
}

exists() { "${B[@]}" inspect --type image "$1" >/dev/null 2>&1; }

report() { # name ref cached seconds
  local size
  # the layers as stored (uncompressed tar: what the image occupies unpacked; a registry push compresses)
  size="$("${B[@]}" inspect --type image "$2" | python3 -I -c '
import json, sys
print(sum(layer["size"] for layer in json.loads(json.load(sys.stdin)["Manifest"])["layers"]))')"
  python3 -I -c 'import json, sys; n, r, s, c, t, *b = sys.argv[1:]; print(json.dumps({"name": n, "ref": r,
    "content": r.rsplit(":content-", 1)[1], "size_bytes": int(s), "cached": c == "true", "seconds": int(t), "buildah": b}))' \
    "$1" "$2" "$size" "$3" "$4" "${B[@]}"
}

build_one() {
  local name="$1" t0 key ref ctr mnt tar
  t0=$(date +%s)
  key="$(image_key "$name")"
  ref="$REGISTRY/$name:content-$key"
  if exists "$ref"; then
    "${B[@]}" tag "$ref" "$REGISTRY/$name:$(version)"
    log "$name: cached ($ref)"
    report "$name" "$ref" true $(($(date +%s) - t0))
    return
  fi
  tar="$(rootfs "$name")"
  ctr="lorafleet-build-$name"
  "${B[@]}" from --name "$ctr" scratch >/dev/null
  mnt="$("${B[@]}" mount "$ctr")"
  log "$name: root filesystem"
  tar -C "$mnt" -xf "$tar"
  # What the install inside needs, placed inside the root (so hard links from uv's cache work: no bind mount).
  local stage="$mnt/.lorafleet-build"
  mkdir -p "$stage/uv-cache"
  cp "$UV" "$stage/uv"
  cp "$WHEEL" "$(requirements "$name")" "$stage/"
  cp "${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}" "$stage/ca.crt" 2>/dev/null || true
  local b=/.lorafleet-build cache uvenv=(--env UV_LINK_MODE=hardlink)
  cache="$("$UV" cache dir 2>/dev/null || true)"
  mkdir -p "$cache"
  if ! cp -al "$cache/archive-v0" "$stage/uv-cache/" 2>/dev/null; then
    # uv's cache is on another filesystem: mounted, and installed by copy (or downloaded into it).
    rm -rf "$stage/uv-cache/archive-v0"
    uvenv=(--env UV_LINK_MODE=copy -v "$cache:$b/uv-cache")
  else
    # Unpacked wheels are hard-linked (immutable entries: no copy of torch's GBs); the rest is small and copied.
    find "$cache" -mindepth 1 -maxdepth 1 ! -name archive-v0 -exec cp -a {} "$stage/uv-cache/" \;
  fi
  log "$name: installing $(grep -c '^[a-z0-9]' "$(requirements "$name")") pinned packages and $(basename "$WHEEL")"
  "${B[@]}" run --isolation chroot --user 0:0 --env UV_CACHE_DIR=$b/uv-cache --env UV_NO_PROGRESS=1 --env SSL_CERT_FILE=$b/ca.crt \
    "${uvenv[@]}" "$ctr" -- /bin/sh -euc "
      python3 -m venv --without-pip $VENV
      install() { $b/uv pip install -q --python $VENV/bin/python --no-deps --compile-bytecode \"\$@\"; }
      # uv's cache first; PyPI for what it lacks (the CA bundle of the building machine, never in the image)
      install --offline --require-hashes -r $b/$name-requirements.txt 2>/dev/null \
        || install --require-hashes -r $b/$name-requirements.txt
      install --offline $b/$(basename "$WHEEL")
      $ADD_USER
      for d in ${VOLUMES[$name]}; do mkdir -p \$d && chown $UID_GID \$d; done
      $VENV/bin/python -c 'import ${IMPORT_CHECK[$name]}'
    " >&2
  rm -rf "$stage"
  local cfg=(--os linux --arch amd64 --user "$UID_GID" --entrypoint "$ENTRYPOINT" --cmd "${CMD[$name]}")
  for e in ${ENVS[$name]}; do cfg+=(--env "$e"); done
  for p in ${PORTS[$name]}; do cfg+=(--port "$p"); done
  for v in ${VOLUMES[$name]}; do cfg+=(--volume "$v"); done
  cfg+=(--label "org.opencontainers.image.source=$SOURCE_URL" --label "org.opencontainers.image.version=$(version)")
  cfg+=(--label "org.opencontainers.image.revision=$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)")
  cfg+=(--label "org.opencontainers.image.licenses=Apache-2.0" --label "org.opencontainers.image.title=lorafleet-$name")
  cfg+=(--label "io.lorafleet.image.content=$key")
  "${B[@]}" config "${cfg[@]}" "$ctr"
  log "$name: committing"
  "${B[@]}" unmount "$ctr" >/dev/null
  # Older content of this image goes first (by ID: a name only untags): the store keeps one image per name, and the
  # disk holds at most the working container, the commit's blob and the new layer at once. The content and version
  # tags are set only by a commit that succeeded: a failed one leaves the name without an image, never a partial one.
  "${B[@]}" images --format '{{.ID}} {{.Name}}' | awk -v n="$REGISTRY/$name" '$2 == n {print $1}' | sort -u \
    | xargs -r "${B[@]}" rmi -f >/dev/null 2>&1 || true
  # buildah writes the layer as a blob into TMPDIR before the store unpacks it: keep that next to the store.
  mkdir -p "$images/tmp"
  TMPDIR="$images/tmp" "${B[@]}" commit -q --rm --format oci "$ctr" "$ref" >/dev/null
  rm -rf "$images/tmp"
  "${B[@]}" tag "$ref" "$REGISTRY/$name:$(version)"
  log "$name: built $ref in $(($(date +%s) - t0))s"
  report "$name" "$ref" false $(($(date +%s) - t0))
}

# What a failed or interrupted build leaves: its working container (a full copy of the image under vfs), the commit's
# blob, a half-written root filesystem, untagged images. Runs under the store's lock before each build and on its
# exit (error and signal included), so the store holds the finished images and nothing else between builds.
sweep() {
  "${B[@]}" containers --noheading --format '{{.ContainerName}}' 2>/dev/null | grep '^lorafleet-build-' \
    | xargs -r "${B[@]}" rm >/dev/null 2>&1 || true
  rm -rf "$images/tmp" "$images"/rootfs/*.tmp
  "${B[@]}" rmi --prune >/dev/null 2>&1 || true
}

build() {
  local names=("$@")
  ((${#names[@]})) || names=(operator worker)
  for n in "${names[@]}"; do known "$n"; done
  ensure_tools
  mkdir -p "$images"
  exec 9>"$images/lock"
  flock 9 # one build at a time per store (CI's stage, then the tests, share it)
  work="$(mktemp -d)"
  trap 'sweep; rm -rf "$work"' EXIT
  trap 'exit 143' TERM
  trap 'exit 130' INT
  sweep # what a build that was killed (SIGKILL, a lost machine) left behind
  build_wheel
  for n in "${names[@]}"; do build_one "$n"; done
}

case "${1:-build}" in
  build) shift || true; build "$@" ;;
  spec) spec "${2:?usage: hack/images.sh spec NAME}" ;;
  lock) lock ;;
  operator | worker) build "$@" ;;
  *) die "usage: hack/images.sh [build] [operator] [worker] | spec NAME | lock" ;;
esac
