#!/usr/bin/env bash
# One command installs everything nucleiseg needs into ./.venv:
#   bash scripts/setup.sh
# torch is pinned to the 2.13.0 CPU build first so that no resolver ever pulls a
# multi-GB CUDA build; the package then installs editable with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test,cluster]"
.venv/bin/python -c "import nucleiseg, torch; print('nucleiseg', nucleiseg.__version__, 'with torch', torch.__version__, 'installed in .venv')"
