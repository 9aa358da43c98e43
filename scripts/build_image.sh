#!/usr/bin/env bash
# Build a tlserve image from the Dockerfile with podman, on a machine that cannot pull base images.
# Usage: bash scripts/build_image.sh [cpu|trainer]          (default cpu; prints the image tag last)
#   TLSERVE_IMAGE_TAG    the tag to build (default tlserve:<target>)
#   TLSERVE_IMAGE_CACHE  where the debootstrapped base rootfs is kept (default /var/cache/tlserve-image)
#   TLSERVE_PIP_CERT     the CA bundle pip trusts during the build (default: the host's, /etc/ssl/certs/ca-certificates.crt)
#   TLSERVE_PIP_LOCAL    1 (default): the build's pip also reads the host pip's local wheel folders; 0: PyPI only
#   TLSERVE_IMAGE_PRUNE  1 (default): remove dangling images after the build (podman image prune); 0: keep them
#   PODMAN               the podman command (default `podman --runtime runc`: crun refuses hybrid cgroups)
# Needs root, podman, runc and debootstrap (bash scripts/install_tools.sh installs them).
#
# The Dockerfile's Python base (python:3.11.14-slim-bookworm) is replaced by a local stand-in when it is not
# in podman's store: a minbase Debian bookworm (python3, python3-venv, python3-pip, ca-certificates) from the
# Debian mirror apt uses, with /usr/local/bin/python and pip symlinks, imported under the base's exact name.
# That is skipped when the tag exists, and the rootfs is cached, so only the first build on a machine pays.
# pip inside the build trusts the host's CA bundle through build-time mounts only (`podman build -v`):
# nothing of the host's is baked into the image. Layers are cached by podman as usual.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET="${1:-cpu}"
case "$TARGET" in
  cpu | trainer) ;;
  *) echo "usage: $0 [cpu|trainer]  (the gpu target's CUDA base has no local stand-in)" >&2; exit 2 ;;
esac
TAG="${TLSERVE_IMAGE_TAG:-tlserve:$TARGET}"
CACHE="${TLSERVE_IMAGE_CACHE:-/var/cache/tlserve-image}"
CERT="${TLSERVE_PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}"
read -r -a PODMAN <<<"${PODMAN:-podman --runtime runc}"
SUITE=bookworm

log() { echo "build_image: $*" >&2; }
die() { log "$*"; exit 1; }

command -v "${PODMAN[0]}" >/dev/null || die "podman not found: run \`bash scripts/install_tools.sh\`"
[ -r "$CERT" ] || die "no CA bundle at $CERT (set TLSERVE_PIP_CERT)"

# The Debian mirror apt already uses (deb822 .sources first, then one-line .list files).
debian_mirror() {
  local uri
  uri="$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' \
         | grep -E '/debian/?$' | head -1 || true)"
  if [ -z "$uri" ]; then
    uri="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
           | awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; break}}' \
           | grep -E '/debian/?$' | head -1 || true)"
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

# The Python base images the Dockerfile names (cpu and trainer build only on them).
python_bases() {
  grep -E '^FROM[[:space:]]+python:' Dockerfile | awk '{print $2}' | sort -u
}

make_stand_in() {
  local base="$1" full="docker.io/library/$1"
  if "${PODMAN[@]}" image exists "$full"; then log "base $full: present"; return; fi
  [[ "$base" =~ ^python:3\.11\.[0-9]+-slim-$SUITE$ ]] \
    || die "no stand-in for $base: Debian $SUITE ships Python 3.11 (change SUITE with the Dockerfile's base)"
  command -v debootstrap >/dev/null || die "debootstrap not found: run \`bash scripts/install_tools.sh\`"
  local rootfs="$CACHE/rootfs-$SUITE"
  if [ ! -f "$rootfs/.tlserve-complete" ]; then
    local mirror
    mirror="$(debian_mirror)"
    log "debootstrap --variant=minbase $SUITE from $mirror into $rootfs"
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
      "$SUITE" "$rootfs" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
      || die "debootstrap failed; see $CACHE/debootstrap.log"
    # Like the python:*-slim images: python and pip on /usr/local/bin, pip may install into the system.
    ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
    ln -sf /usr/bin/pip3 "$rootfs/usr/local/bin/pip"
    rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    touch "$rootfs/.tlserve-complete"
  else
    log "rootfs: cached in $rootfs"
  fi
  # The build mounts its pip.conf on /etc/xdg/pip; the empty folder is made here so no layer records a mount point.
  mkdir -p "$rootfs/etc/xdg/pip"
  local version
  version="$(chroot "$rootfs" python3 -c 'import platform; print(platform.python_version())')"
  log "podman import $rootfs as $full (Debian $SUITE, Python $version)"
  tar --exclude=./.tlserve-complete -C "$rootfs" -c . \
    | "${PODMAN[@]}" import \
      --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' \
      --change "LABEL org.tlserve.stand-in=\"debootstrap $SUITE minbase, Python $version\"" \
      --change 'CMD ["python3"]' \
      - "$full" >/dev/null
}

# One build at a time on a machine (make image and the tests may race): the lock covers base, build and prune.
mkdir -p "$CACHE"
exec 9>"$CACHE/lock"
flock 9
for base in $(python_bases); do make_stand_in "$base"; done

# The host pip's local package sources (file:// indexes and find-links folders in its config), one per line as
# "index|links PATH"; an index's PATH is the folder above its simple/ (its pages link to ../../files/).
host_pip_sources() {
  [ "${TLSERVE_PIP_LOCAL:-1}" = 1 ] || return 0
  python3 - <<'PY' || true
import ast, os, subprocess, sys
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
seen = set()
for line in out.splitlines():
    key, _, value = line.partition("=")
    kind = {"find-links": "links", "extra-index-url": "index", "index-url": "index"}.get(key.rsplit(".", 1)[-1])
    if kind is None:
        continue
    for url in ast.literal_eval(value).split():
        path = url[len("file://"):] if url.startswith("file://") else url
        if kind == "index" and os.path.basename(path.rstrip("/")) == "simple":
            path = os.path.dirname(path.rstrip("/"))
        if os.path.isabs(path) and os.path.isdir(path) and (kind, path) not in seen:
            seen.add((kind, path))
            print(kind, path)
PY
}

# pip during the build: a folder holding the host's CA bundle and a pip.conf naming it, mounted read-only on
# /etc/xdg/pip (pip's site-wide config folder, empty in the stand-in base) for RUN steps only. The host pip's
# local package folders (if any) are mounted below it and named in that pip.conf, so a build takes wheels the
# host already has (torch: 3 GB) from disk; PyPI stays the index. TLSERVE_PIP_LOCAL=0 leaves them out.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp "$CERT" "$work/ca.pem"
mounts=(-v "$work:/etc/xdg/pip:ro")
indexes=() links=() n=0
while read -r kind path; do
  [ -n "$kind" ] || continue
  mkdir -p "$work/local/$n"
  mounts+=(-v "$path:/etc/xdg/pip/local/$n:ro")
  if [ "$kind" = index ]; then indexes+=("file:///etc/xdg/pip/local/$n/simple"); else links+=("/etc/xdg/pip/local/$n"); fi
  log "pip source: $path ($kind)"
  n=$((n + 1))
done < <(host_pip_sources)
{
  printf '[global]\ncert = /etc/xdg/pip/ca.pem\ndefault-timeout = 180\n'
  [ ${#indexes[@]} -eq 0 ] || printf 'extra-index-url = %s\n' "${indexes[*]}"
  [ ${#links[@]} -eq 0 ] || printf 'find-links = %s\n' "${links[*]}"
} >"$work/pip.conf"
chmod -R a+rX "$work"

log "podman build --target $TARGET -t $TAG"
start=$SECONDS
"${PODMAN[@]}" build --pull=never --network host --format docker --layers \
  --target "$TARGET" -t "$TAG" \
  "${mounts[@]}" \
  -f Dockerfile . >&2
log "built $TAG in $((SECONDS - start)) s, $("${PODMAN[@]}" image inspect --format '{{.Size}}' "$TAG") bytes"
# Replaced images and stale cache leaves would fill the disk build after build (the trainer is 6 GB); the layers
# of the tagged images, the cache that matters, stay. TLSERVE_IMAGE_PRUNE=0 keeps everything.
if [ "${TLSERVE_IMAGE_PRUNE:-1}" = 1 ]; then "${PODMAN[@]}" image prune -f >/dev/null || true; fi
echo "$TAG"
