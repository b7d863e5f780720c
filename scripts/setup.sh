#!/usr/bin/env bash
# Creates .venv with everything the library, its tests and benchmarks need.
# On a machine whose Python already has a CUDA build of torch, pass --system-site-packages
# through VENV_ARGS to reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv ${VENV_ARGS:-} .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q "torch==2.13.0" || .venv/bin/python -m pip install -q torch
fi
.venv/bin/python -m pip install -q -r requirements-test.txt
.venv/bin/python -m pip install -q --no-deps "torchattacks==3.5.1"  # see requirements-test.txt
.venv/bin/python -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
