#!/usr/bin/env bash
# Creates .venv-monailabel (if missing): the environment of the MONAI Label app (apps/monailabel) and of its
# integration test (tests/test_monailabel.py). The bundle's own .venv is not touched.
#
# Why not `pip install monailabel`: its dependencies (monai[...,torchvision], sam2, numpymaxflow, scikit-learn,
# ninja, ...) replace the CPU torch with a multi-GB CUDA build and pin numpy<2. So monailabel is installed
# without dependencies, followed by what the server, its infer tasks and the bundle import:
# - MONAI Label's server imports: fastapi, uvicorn, pydantic(-settings), dicomweb-client[gcp] (google-auth),
#   pydicom/pynetdicom, pydicom-seg (imported by /infer; installed --no-deps because it pins numpy<2, plus the
#   SimpleITK and jsonschema it imports), girder-client, shapely, watchdog, ... (list below).
# - pydicom 3 breaks pydicom-seg: pydicom<3, pynetdicom<3, dicomweb-client<0.60.
# - torchvision is left out: PyPI has no build for the CPU torch 2.13 wheel. The one module that imports it at
#   the top (monailabel/transform/post.py) is imported by apps/monailabel/lib/compat.py, which explains why.
# pip then reports the monailabel requirements left out as "dependency conflicts"; that message is expected.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-monailabel}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q)
"${PIP[@]}" --upgrade pip
# Torch first, so that the CPU wheel is the one every later line finds already satisfied.
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" --no-deps "monailabel==0.8.5" "pydicom-seg==0.4.1"
"${PIP[@]}" \
    "monai==1.6.1" "numpy>=1.26,<3" \
    "fastapi>=0.110.2" "uvicorn>=0.29.0" "pydantic>=2.7.0" "pydantic-settings>=2.2.1" "python-dotenv>=1.0.1" \
    "python-multipart>=0.0.9" "httpx>=0.27.0" "requests>=2.31.0" "requests-toolbelt>=1.0.0" "urllib3>=2.2.1" \
    "schedule>=1.2.1" "timeloop>=1.0.2" "expiringdict>=1.2.2" "expiring_dict>=1.1.0" "cachetools>=5.3.3" \
    "watchdog>=4.0.0" "filelock>=3.11.0" "passlib>=1.7.4" "pyjwt>=2.8.0" "bcrypt>=4.1.2" "shapely>=2.0.4" \
    "pyyaml>=6.0.1" "einops>=0.7.0" "girder-client>=3.2.3" "psutil" "pynrrd>=1.0.0" \
    "pydicom>=2.4.4,<3" "pynetdicom>=2.0.2,<3" "dicomweb-client[gcp]>=0.59.1,<0.60" "SimpleITK>=2,<3" "jsonschema" \
    -r requirements.txt "pytest>=8,<10"
# Fails here, not in a test, if MONAI Label's server or the app's infer tasks cannot be imported.
"$VENV/bin/python" -B -c "
import sys; sys.path.insert(0, 'apps/monailabel')
import monailabel, monailabel.app, monai, torch, lib.infers
print('monailabel', monailabel.__version__, 'monai', monai.__version__, 'torch', torch.__version__)"
echo "Environment ready: $VENV"
