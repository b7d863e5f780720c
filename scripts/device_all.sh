#!/usr/bin/env bash
# Device calls: builds the C++/CUDA extension, runs the tier-2 (GPU) tests of every op and the
# GPU benchmarks, each stage under its own time limit. Logs go to $OUT/logs.txt (one file, as
# few files come back), results to $OUT/*.json, and a summary is printed last.
#   bash scripts/device_all.sh                 # every stage (more than one 10-minute call)
#   bash scripts/device_all.sh STAGE [STAGE..] # only these (names below)
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 PYTHONPATH=.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG="$OUT/logs.txt"; SUMMARY="$OUT/summary.txt"; : > "$SUMMARY"; : > "$LOG"
WANT=" $* "

stage() {  # stage NAME SECONDS COMMAND...: run if selected, append its log, record rc and time
    local name=$1 limit=$2; shift 2
    [[ "$WANT" == "  " || "$WANT" == *" $name "* ]] || return 0
    local start=$(date +%s) tmp=$(mktemp)
    timeout "$limit" "$@" > "$tmp" 2>&1
    local rc=$?
    { echo "===== $name (rc=$rc)"; cat "$tmp"; } >> "$LOG"
    echo "$name rc=$rc $(( $(date +%s) - start ))s | $(grep -E 'passed|failed|error' "$tmp" | tail -1)" | tee -a "$SUMMARY"
    rm -f "$tmp"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  date -u +%Y-%m-%dT%H:%M:%SZ; } | tee "$OUT/env.txt"

stage ext_build 150 python3 -c "from anchor_kernels import _ext; print('cpu:', _ext.load()); print('cuda:', _ext.cuda_error())"
stage tests_triton 150 env ANCHOR_KERNELS_AUTOTUNE=0 python3 -m pytest -q -ra -x -m gpu \
    tests/test_supcon_triton.py tests/test_supcon_api.py
stage tests_triton_chunked 60 env ANCHOR_KERNELS_AUTOTUNE=0 python3 -m pytest -q -ra -x \
    tests/test_supcon_triton.py -k "chunked or two_sets or lse_only"
stage tests_cuda_ext 90 python3 -m pytest -q -ra -x -m gpu tests/test_supcon_cpp.py
stage tests_pgd 45 python3 -m pytest -q -ra -x tests/test_pgd.py tests/test_attacks.py -m gpu
stage tests_sim 90 env ANCHOR_KERNELS_AUTOTUNE=0 python3 -m pytest -q -ra -x -m gpu \
    tests/test_similarity.py tests/test_hard_positive.py tests/test_supcon_topk.py
stage tests_sim_all 300 env ANCHOR_KERNELS_AUTOTUNE=0 python3 -m pytest -q -ra -x \
    tests/test_similarity.py tests/test_hard_positive.py tests/test_supcon_topk.py
stage tests_train 80 python3 -m pytest -q -ra -x tests/test_train.py -m gpu -k "not compile"
stage bench_supcon 110 python3 benchmarks/supcon_gpu_table.py --backends triton cuda eager \
    --out "$OUT/supcon_gpu_bf16.json"
stage bench_supcon_cuda 70 python3 benchmarks/supcon_gpu_table.py --backends cuda triton \
    --n 4096 16384 65536 --out "$OUT/supcon_gpu_cuda_bf16.json"
stage bench_supcon_fp32 90 python3 benchmarks/supcon_gpu_table.py --dtype float32 \
    --backends triton cuda eager --n 4096 16384 --out "$OUT/supcon_gpu_fp32.json"
stage bench_pgd 45 python3 benchmarks/bench_pgd.py --gpu --out "$OUT/pgd_gpu.json"
stage bench_train 80 python3 -m anchor_kernels.train.bench --batch 512 4096 \
    --loss-backend eager triton --steps 5 --warmup 2 --out "$OUT/train_step.json"
stage errors 90 python3 scripts/supcon_errors.py --n 4096 --backends triton cuda
stage bench_hard_positive 90 python3 -m pytest -q benchmarks/bench_hard_positive.py \
    -k "bfloat16 and k4 and (triton or eager or compiled)" --benchmark-columns=median,iqr,rounds \
    --benchmark-json "$OUT/hard_positive_gpu.json"
stage bench_similarity 60 python3 -m pytest -q benchmarks/bench_similarity.py \
    -k "bfloat16 and (triton or eager or compiled)" --benchmark-columns=median,iqr,rounds \
    --benchmark-json "$OUT/similarity_gpu.json"
# The lean loss (one launch each way, class sums, fixed shift): GPU tests including CUDA-graph
# replay and the no-sync check, then N = 512 .. 131072 at beta 0 and 1 with the sdpa-flash
# neighbour, each sweep bounded by its own time budget.
stage tests_supcon_lean 170 python3 -m pytest -q -ra -x -m gpu tests/test_supcon_graphs.py \
    tests/test_supcon_triton.py tests/test_supcon_launches.py
stage sweep_supcon_beta0 120 python3 -m benchmarks --ops supcon --dtypes bfloat16 \
    --sizes 512 1024 2048 4096 8192 16384 32768 65536 131072 --passes fwd bwd fwd+bwd \
    --candidates triton cuda eager compile sdpa-flash --time-budget 100 --no-fit \
    --no-progress --out "$OUT/supcon_sweep_beta0.json"
stage sweep_supcon_beta1 100 python3 -m benchmarks --ops supcon --dtypes bfloat16 \
    --sizes 4096 16384 65536 131072 --passes fwd+bwd --candidates triton sdpa-flash \
    --set supcon.beta=1.0 --time-budget 80 --no-fit --no-progress \
    --out "$OUT/supcon_sweep_beta1.json"
stage runner_sweep 140 python3 -m benchmarks --gpu-sweep --time-budget 60 --fit-budget 30 \
    --no-progress --out "$OUT/sweep_h100.json"

echo; cat "$SUMMARY"
