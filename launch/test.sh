#!/usr/bin/env bash
# Sets up and runs the test suite (CPU only, no network): the README's second Quickstart command.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec "${PYTHON:-python3}" -m pytest -q tests "$@"
