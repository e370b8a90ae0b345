#!/usr/bin/env bash
# Sets up and runs the main job end to end on the embedded default (scikit-image's photos, the tiny preset, CPU):
# the README's first Quickstart command. Outputs go to demo/ (override: bash launch/demo.sh --output DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec "${PYTHON:-python3}" -m stages.demo "$@"
