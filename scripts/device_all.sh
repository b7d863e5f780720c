#!/usr/bin/env bash
# One device call: builds the C++/CUDA extension, runs the tier-2 (GPU) tests of every op and
# the GPU benchmarks, each stage under its own time limit; logs and JSON go to $OUT, and a
# short summary is printed last.
#   bash scripts/device_all.sh
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 PYTHONPATH=.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"; : > "$SUMMARY"

stage() {  # stage NAME SECONDS COMMAND...: run, log to $OUT/NAME.log, record rc and time
    local name=$1 limit=$2; shift 2
    local start=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $(( $(date +%s) - start ))s | $(grep -E 'passed|failed|error' "$OUT/$name.log" | tail -1)" | tee -a "$SUMMARY"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  date -u +%Y-%m-%dT%H:%M:%SZ; } | tee "$OUT/env.txt"

# The extension builds on the CPU cores while the Triton tests use the GPU.
timeout 240 python3 -c "from anchor_kernels import _ext; print('cpu:', _ext.load()); print('cuda:', _ext.cuda_error())" \
    > "$OUT/ext_build.log" 2>&1 &
BUILD=$!
stage tests_triton 120 env ANCHOR_KERNELS_AUTOTUNE=0 python3 -m pytest -q -ra -x -m gpu \
    tests/test_supcon_triton.py tests/test_supcon_api.py
wait $BUILD; echo "ext_build rc=$? | $(tail -2 "$OUT/ext_build.log" | tr '\n' ' ')" | tee -a "$SUMMARY"
stage tests_cuda_ext 100 python3 -m pytest -q -ra -x -m gpu tests/test_supcon_cpp.py
stage tests_pgd 50 python3 -m pytest -q -ra -x tests/test_pgd.py tests/test_attacks.py -m gpu
stage tests_train 80 python3 -m pytest -q -ra -x tests/test_train.py -m gpu -k "not compile"
stage bench_supcon 110 python3 benchmarks/supcon_gpu_table.py --backends triton cuda eager \
    --out "$OUT/supcon_gpu_bf16.json"
stage bench_pgd 45 python3 benchmarks/bench_pgd.py --gpu --out "$OUT/pgd_gpu.json"
stage bench_train 80 python3 -m anchor_kernels.train.bench --batch 512 4096 --loss-backend eager triton --steps 5 --warmup 2 --out "$OUT/train_step.json"

echo; cat "$SUMMARY"
tail -12 "$OUT/bench_supcon.log"
