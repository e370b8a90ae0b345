#!/usr/bin/env bash
# Sets up and runs the test suite (CPU only, no network): the README's second Quickstart command.
# Two pytest workers (pytest-xdist), one intra-op thread each (tests/conftest.py): the suite is mostly single-threaded
# work and subprocess start-up, so two workers on two cores take about half the time of one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
# Only the plugins the suite uses (xdist): others installed in the environment (hypothesis, benchmark, ...) would be
# imported by every pytest process, about 1 s each here, and could change how tests run.
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
exec "${PYTHON:-python3}" -m pytest -p xdist.plugin -q -n "${TEST_WORKERS:-2}" --dist worksteal "$@"  # no path: testpaths (tests/)
