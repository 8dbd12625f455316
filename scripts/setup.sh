#!/usr/bin/env bash
# Creates .venv (if missing) and installs the bundle's requirements with the CPU build of PyTorch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# Installing torch first pins the CPU wheel; requirements.txt bounds torch so pip never swaps in a CUDA build.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -r requirements-dev.txt
echo "Environment ready: $VENV"
