#!/usr/bin/env bash
# Sets up and runs the test suite (CPU only, no network): the README's second Quickstart command.
# Two pytest workers (pytest-xdist), one intra-op thread each (tests/conftest.py): the suite is mostly single-threaded
# work and subprocess start-up, so two workers on two cores take about half the time of one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec "${PYTHON:-python3}" -m pytest -q -n "${TEST_WORKERS:-2}" --dist worksteal tests "$@"
