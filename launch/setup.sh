#!/usr/bin/env bash
# Installs firststage into the current Python (your venv or conda env if one is active).
# torch: an importable torch is kept as it is; with none, the pair that is known to import together is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: no torch found; installing torch==2.14.1 torchvision==0.29.1"
  "$PY" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
fi
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "Running pip as the 'root' user" || true
"$PY" -c "import pipeline, stages, torch, torchvision, diffusers, accelerate, webdataset, lpips" \
  || { echo "setup: firststage did not import after install" >&2; exit 1; }
