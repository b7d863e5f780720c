#!/usr/bin/env bash
# Device calls for pairwise_similarity, hard_positive_mining and the loss's top-k mode, each
# under the 10-minute limit of one call:
#   bash scripts/device_similarity.sh test    # extension build + tier-1 and tier-2 tests of
#                                             # similarity and selection on the GPU (~8 min)
#   bash scripts/device_similarity.sh topk    # tier-1 and tier-2 tests of the top-k loss (~6 min)
#   bash scripts/device_similarity.sh bench   # pytest-benchmark: similarity, then selection (~9 min)
# Outputs (logs, pytest-benchmark JSON) go to $OUT (default /tmp/out).
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 PYTHONPATH=.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
phase=${1:-test}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  date -u +%Y-%m-%dT%H:%M:%SZ; } | tee "$OUT/env_similarity.txt"
start=$(date +%s)
timeout 270 python3 -c "
from anchor_kernels import _ext
print('load:', _ext.load()); print('cuda:', _ext.cuda_error())" > "$OUT/similarity_ext_build_$phase.log" 2>&1
echo "build rc=$? in $(( $(date +%s) - start )) s"; tail -2 "$OUT/similarity_ext_build_$phase.log"
case "$phase" in
test)
    timeout 500 python3 -m pytest -q -ra -x tests/test_similarity.py tests/test_hard_positive.py \
        --durations=15 > "$OUT/similarity_pytest.log" 2>&1
    echo "pytest rc=$?"; tail -25 "$OUT/similarity_pytest.log" ;;
topk)
    timeout 500 python3 -m pytest -q -ra -x tests/test_supcon_topk.py --durations=15 \
        > "$OUT/supcon_topk_pytest.log" 2>&1
    echo "pytest rc=$?"; tail -25 "$OUT/supcon_topk_pytest.log" ;;
bench)
    timeout 250 python3 -m pytest -q benchmarks/bench_similarity.py \
        --benchmark-json "$OUT/similarity_gpu.json" --benchmark-columns=median,iqr,rounds \
        > "$OUT/similarity_bench.log" 2>&1
    echo "bench similarity rc=$?"; grep -E "^test_|passed|failed" "$OUT/similarity_bench.log" | tail -70
    timeout 300 python3 -m pytest -q benchmarks/bench_hard_positive.py \
        --benchmark-json "$OUT/hard_positive_gpu.json" --benchmark-columns=median,iqr,rounds \
        > "$OUT/hard_positive_bench.log" 2>&1
    echo "bench hard_positive rc=$?"; grep -E "^test_|passed|failed" "$OUT/hard_positive_bench.log" | tail -100 ;;
esac
