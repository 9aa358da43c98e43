#!/usr/bin/env bash
# Install Triton's perf_analyzer (idempotent; a second run only checks it starts).
#   apt-get install libb64-0d                  (its one system library; needs root or sudo)
#   pip install 'tritonclient[grpc]==2.50.0' nvidia-cuda-runtime-cu12   into .tools/pa, its own venv,
#       so that the project venv keeps its own tritonclient
#   .tools/bin/perf_analyzer                   a wrapper that puts the CUDA runtime on LD_LIBRARY_PATH
# Usage: bash scripts/install_perf_analyzer.sh   (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS="${TLSERVE_TOOLS_DIR:-$PWD/.tools}"
VENV="$TOOLS/pa"
WRAPPER="$TOOLS/bin/perf_analyzer"
PYTHON="${PYTHON:-python3}"

log() { echo "install_perf_analyzer: $*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi
}

if ! ldconfig -p | grep -q 'libb64\.so\.0d'; then
  log "libb64-0d: apt-get install"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libb64-0d >/dev/null
fi

if [ ! -x "$VENV/bin/perf_analyzer" ]; then
  log "pip: tritonclient[grpc]==2.50.0 nvidia-cuda-runtime-cu12 into $VENV"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check 'tritonclient[grpc]==2.50.0' nvidia-cuda-runtime-cu12
fi

CUDART="$("$VENV/bin/python" -c 'import nvidia.cuda_runtime, os; print(os.path.join(nvidia.cuda_runtime.__path__[0], "lib"))')"
mkdir -p "$(dirname "$WRAPPER")"
cat > "$WRAPPER" <<WRAP
#!/usr/bin/env bash
# Written by scripts/install_perf_analyzer.sh: perf_analyzer with its CUDA runtime on the library path.
export LD_LIBRARY_PATH="$CUDART\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$VENV/bin/perf_analyzer" "\$@"
WRAP
chmod 0755 "$WRAPPER"

"$WRAPPER" --version >/dev/null 2>&1 || { log "perf_analyzer does not start; try: $WRAPPER --version"; exit 1; }
log "ready: $WRAPPER"
