#!/usr/bin/env bash
# Creates .venv with everything the library, its tests and benchmarks need, and installs the
# package into it (editable).
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
# torchattacks (the attack tests compare against it) without its dependencies: it asks for
# torchvision, whose pin would replace the torch installed above, and does not need it.
.venv/bin/python -m pip install -q scipy requests
.venv/bin/python -m pip install -q --no-deps "torchattacks==3.5.1"
# The CUTLASS/CuTe headers the CUDA half of the C++ extension is compiled with: only the headers
# are used (found without importing the package), so not its Python dependencies (cuda-python).
.venv/bin/python -m pip install -q --no-deps "nvidia-cutlass==4.2.0.0"
# The package itself, editable, so that `anchor-train` and `import anchor_kernels` work from any
# folder. No build isolation and no C++ build here (seconds): the extension compiles just in
# time on first use, or ahead of time with ANCHOR_KERNELS_BUILD_EXT=1 (see README.md).
.venv/bin/python -m pip install -q "setuptools>=64" wheel
ANCHOR_KERNELS_BUILD_EXT=0 .venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
.venv/bin/python -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
