#!/usr/bin/env bash
# Device calls for the C++/CUDA extension, each under the 10-minute limit of one call:
#   bash scripts/device_ext.sh test    # JIT build of both halves (timed) + tier-2 tests (~5 min)
#   bash scripts/device_ext.sh bench   # GPU table: cuda vs triton vs eager, bf16 and fp32 (~6 min)
# Outputs go to $OUT (default /tmp/out).
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
phase=${1:-test}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/env_ext.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/env_ext.txt"
start=$(date +%s)
ANCHOR_KERNELS_VERBOSE_BUILD=1 timeout 270 python3 -c "
from anchor_kernels import _ext
print('load:', _ext.load()); print('cuda:', _ext.cuda_error())" > "$OUT/ext_build_$phase.log" 2>&1
echo "build rc=$? in $(( $(date +%s) - start )) s"; tail -2 "$OUT/ext_build_$phase.log"
if [ "$phase" = test ]; then
    timeout 280 python3 -m pytest -q -ra -x tests/test_supcon_cpp.py tests/test_ext_build.py \
        tests/test_supcon_cuda_emulated.py > "$OUT/pytest_ext.log" 2>&1; echo "pytest rc=$?"
    tail -15 "$OUT/pytest_ext.log"
else
    for dtype in bfloat16 float32; do
        PYTHONPATH=. timeout 270 python3 benchmarks/supcon_gpu_table.py --dtype $dtype \
            --backends cuda triton eager --out "$OUT/supcon_gpu_ext_$dtype.json" > "$OUT/bench_ext_$dtype.log" 2>&1
        echo "bench $dtype rc=$?"; tail -12 "$OUT/bench_ext_$dtype.log"
    done
fi
