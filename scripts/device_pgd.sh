#!/usr/bin/env bash
# Device calls for PGD, each under the 10-minute limit of one call:
#   bash scripts/device_pgd.sh test    # extension build (cached after the first) + tier-2 tests (~5 min)
#   bash scripts/device_pgd.sh bench   # GB/s table of step and random start, attack overhead (~3 min)
# Outputs go to $OUT (default /tmp/out).
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
phase=${1:-test}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/env_pgd.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/env_pgd.txt"
start=$(date +%s)
timeout 270 python3 -c "
from anchor_kernels import _ext
print('load:', _ext.load()); print('cuda:', _ext.cuda_error())" > "$OUT/pgd_ext_build_$phase.log" 2>&1
echo "build rc=$? in $(( $(date +%s) - start )) s"; tail -2 "$OUT/pgd_ext_build_$phase.log"
if [ "$phase" = test ]; then
    timeout 300 python3 -m pytest -q -ra -x tests/test_pgd.py tests/test_attacks.py > "$OUT/pgd_pytest.log" 2>&1
    echo "pytest rc=$?"; tail -15 "$OUT/pgd_pytest.log"
else
    PYTHONPATH=. timeout 300 python3 benchmarks/bench_pgd.py --gpu --out "$OUT/pgd_gpu.json" > "$OUT/pgd_bench.log" 2>&1
    echo "bench rc=$?"; tail -32 "$OUT/pgd_bench.log"
fi
