#!/usr/bin/env bash
# Device calls: builds the C++/CUDA extension, runs the tier-2 (GPU) tests of every op and the
# GPU benchmarks, each stage under its own time limit, and prints a summary and the tables last.
#   bash scripts/device_all.sh                 # every stage (more than one 10-minute call)
#   bash scripts/device_all.sh STAGE [STAGE..] # only these (names below)
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 PYTHONPATH=.
# Results gather in RES and are packed into $OUT/results.tgz after every stage: one file comes
# back however many the stages write, even from a call stopped at its time limit.
OUT=${OUT:-/tmp/out}; RES=/tmp/device_results; mkdir -p "$OUT" "$RES"
LOG="$RES/logs.txt"; SUMMARY="$RES/summary.txt"; : > "$SUMMARY"; : > "$LOG"
pack() { tar czf "$OUT/results.tgz.tmp" -C "$RES" . && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"; }
WANT=" $* "

stage() {  # stage NAME SECONDS COMMAND...: run if selected, append its log, record rc and time
    local name=$1 limit=$2; shift 2
    [[ "$WANT" == "  " || "$WANT" == *" $name "* ]] || return 0
    local start=$(date +%s) tmp=$(mktemp)
    timeout "$limit" "$@" > "$tmp" 2>&1
    local rc=$?
    { echo "===== $name (rc=$rc)"; cat "$tmp"; } >> "$LOG"
    echo "$name rc=$rc $(( $(date +%s) - start ))s | $(grep -E 'passed|failed|error' "$tmp" | tail -1)" | tee -a "$SUMMARY"
    rm -f "$tmp"; pack
}

# Packages the GPU image lacks (torchattacks; nvidia-cutlass, whose headers the CUDA half of the
# extension is compiled with and which is found without importing it, so without its
# dependencies) travel as wheels in .whl, made beforehand with
#   echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: \
#     --python-version 3.12 --platform manylinux2014_x86_64 -d .whl torchattacks==3.5.1 \
#     nvidia-cutlass==4.2.0.0
# and carried with the call.
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
fi

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  date -u +%Y-%m-%dT%H:%M:%SZ; } | tee "$RES/env.txt"

stage ext_build 300 python3 -c "from anchor_kernels import _ext; print('cpu:', _ext.load()); print('cuda:', _ext.cuda_error())"
# Compiles every Triton kernel variant of the sm_90 report on all cores at once, into the
# Triton cache that the runtime reads: where the report's specialisation is the runtime's,
# the stages after it find their kernels compiled (the stage times say whether it paid).
stage prewarm 90 env -u TRITON_INTERPRET python3 -m anchor_kernels.ops.sm90_check --jobs 16
stage tests_triton 150 env ANCHOR_KERNELS_AUTOTUNE=0 python3 -m pytest -q -ra -x -m gpu \
    tests/test_supcon_triton.py tests/test_supcon_api.py
stage tests_triton_chunked 60 env ANCHOR_KERNELS_AUTOTUNE=0 python3 -m pytest -q -ra -x \
    tests/test_supcon_triton.py -k "chunked or two_sets or lse_only"
stage tests_cuda_ext 180 python3 -m pytest -q -ra -x -m gpu tests/test_supcon_cpp.py \
    tests/test_bad_inputs.py
# Every Hopper kernel variant once against the sm_80 kernels and float64, each under its own
# time limit: a variant that hangs or fails is named and the others still run.
stage smoke_sm90 400 python3 scripts/sm90_smoke.py --timeout 45 --json "$RES/sm90_smoke.json"
# The same tests with the Hopper (sm_90a) kernels chosen, which they await before becoming the
# default on compute capability 9.0.
stage tests_cuda_sm90 180 env ANCHOR_KERNELS_CUDA_KERNELS=sm90 python3 -m pytest -q -ra -x -m gpu \
    tests/test_supcon_cpp.py tests/test_bad_inputs.py
stage tests_pgd 60 python3 -m pytest -q -ra -x tests/test_pgd.py tests/test_attacks.py tests/test_attack_graph.py -m gpu
stage tests_sim 180 env ANCHOR_KERNELS_AUTOTUNE=0 python3 -m pytest -q -ra -x -m gpu \
    tests/test_similarity.py tests/test_hard_positive.py tests/test_supcon_topk.py
stage tests_sim_all 300 env ANCHOR_KERNELS_AUTOTUNE=0 python3 -m pytest -q -ra -x \
    tests/test_similarity.py tests/test_hard_positive.py tests/test_supcon_topk.py \
    tests/test_rows_triton.py
stage tests_train 80 python3 -m pytest -q -ra -x tests/test_train.py -m gpu -k "not compile"
stage bench_supcon 110 python3 benchmarks/supcon_gpu_table.py --backends triton cuda eager \
    --out "$RES/supcon_gpu_bf16.json"
stage bench_supcon_cuda 70 python3 benchmarks/supcon_gpu_table.py --backends cuda triton \
    --n 4096 16384 65536 --out "$RES/supcon_gpu_cuda_bf16.json"
# The CUDA C++ loss (CuTe tensor-core kernels) against Triton, each pass, interleaved.
stage bench_cuda_mma 150 python3 -m benchmarks --ops supcon --dtypes bfloat16 \
    --sizes ${CUDA_SIZES:-1024 4096 16384 65536} --passes fwd bwd fwd+bwd --candidates cuda triton \
    --time-budget 120 --no-fit --no-progress --no-plot --out "$RES/supcon_cuda.json"
stage bench_cuda_sm90 150 env ANCHOR_KERNELS_CUDA_KERNELS=sm90 python3 -m benchmarks --ops supcon \
    --dtypes bfloat16 --sizes ${CUDA_SIZES:-1024 4096 16384 65536} --passes fwd bwd fwd+bwd \
    --candidates cuda triton --time-budget 120 --no-fit --no-progress --no-plot \
    --out "$RES/supcon_cuda_sm90.json"
# float32 where torch allows TF32: the CUDA loss's TF32 forward against Triton's TF32 and eager
# PyTorch (cuBLAS in TF32), each pass; then with the Hopper kernels chosen.
stage bench_cuda_tf32 150 python3 -m benchmarks --ops supcon --dtypes float32 \
    --float32-matmul-precision high --sizes ${CUDA_SIZES:-1024 4096 16384 65536} \
    --passes fwd bwd fwd+bwd --candidates cuda triton eager --time-budget 120 --no-fit \
    --no-progress --no-plot --out "$RES/supcon_cuda_tf32.json"
stage bench_cuda_sm90_tf32 150 env ANCHOR_KERNELS_CUDA_KERNELS=sm90 python3 -m benchmarks --ops supcon \
    --dtypes float32 --float32-matmul-precision high --sizes ${CUDA_SIZES:-1024 4096 16384 65536} \
    --passes fwd bwd fwd+bwd --candidates cuda triton --time-budget 120 --no-fit --no-progress \
    --no-plot --out "$RES/supcon_cuda_sm90_tf32.json"
stage bench_supcon_fp32 90 python3 benchmarks/supcon_gpu_table.py --dtype float32 \
    --backends triton cuda eager --n 4096 16384 --out "$RES/supcon_gpu_fp32.json"
stage bench_pgd 45 python3 benchmarks/bench_pgd.py --gpu --out "$RES/pgd_gpu.json"
stage bench_train 120 python3 -m anchor_kernels.train.bench --batch 512 4096 \
    --loss-backend conventional eager triton --attack-graph off on --steps 5 --warmup 2 \
    --out "$RES/train_step.json"
# One epoch of 50,000 CIFAR-sized images (ANCHOR, PGD-10, full-width ResNet-18, bf16), the
# attack eager and replayed from a CUDA graph: metrics.jsonl has the epoch's wall time (the
# run's checkpoint stays out of the results).
for graph in off on; do
    run_dir=/tmp/train_epoch_graph_$graph
    stage "train_epoch_graph_$graph" 150 bash -c "python3 -m anchor_kernels.train \
        --dataset synthetic --synthetic-train-size 50000 --synthetic-test-size 1000 --epochs 1 \
        --batch-size 512 --eval-samples 500 --final-eval-samples 500 --no-progress --overwrite \
        --out-dir $run_dir $([[ $graph == on ]] && echo --attack-graph) \
        && mkdir -p $RES/$(basename $run_dir) && cp $run_dir/*.json* $RES/$(basename $run_dir)/"
done
stage errors 90 python3 scripts/supcon_errors.py --n 4096 --backends triton cuda
# The CUDA selection on its CuTe kernel against its general kernel, and Triton.
stage bench_hard_positive_cuda 120 python3 -m pytest -q benchmarks/bench_hard_positive.py \
    -k "bfloat16 and k4 and (cuda or triton)" --benchmark-columns=median,iqr,rounds \
    --benchmark-json "$RES/hard_positive_cuda_gpu.json"
stage bench_hard_positive 90 python3 -m pytest -q benchmarks/bench_hard_positive.py \
    -k "bfloat16 and k4 and (triton or eager or compiled)" --benchmark-columns=median,iqr,rounds \
    --benchmark-json "$RES/hard_positive_gpu.json"
# The CUDA similarity on the CuTe kernels against its general kernels (the ones it replaced
# where they run: ANCHOR_KERNELS_CUDA_KERNELS=general) and Triton.
stage bench_similarity_cuda 120 python3 -m pytest -q benchmarks/bench_similarity.py \
    -k "bfloat16 and (cuda or triton)" --benchmark-columns=median,iqr,rounds \
    --benchmark-json "$RES/similarity_cuda_gpu.json"
stage bench_similarity 60 python3 -m pytest -q benchmarks/bench_similarity.py \
    -k "bfloat16 and (triton or eager or compiled)" --benchmark-columns=median,iqr,rounds \
    --benchmark-json "$RES/similarity_gpu.json"
# The size rules of the Triton loss measured (and its CUDA-graph replay, and the host floor).
stage tune_supcon 100 python3 scripts/supcon_tune.py --profile --n ${TUNE_SIZES:-1024 4096 8192 131072} \
    --out "$RES/supcon_tune.json"
# The lean loss (one launch each way, class sums, fixed shift): CUDA-graph replay, no-sync and
# determinism, then correctness of the half-precision variants, untuned (each variant then
# compiles once rather than once per configuration; float32 at "highest" precision compiles
# for minutes: tests_triton covers it).
stage tests_graphs 100 env ANCHOR_KERNELS_AUTOTUNE=0 python3 -m pytest -q -ra -x -m gpu \
    tests/test_supcon_graphs.py tests/test_supcon_launches.py
stage tests_graphs_ops 90 env ANCHOR_KERNELS_AUTOTUNE=0 python3 -m pytest -q -ra -m gpu \
    tests/test_similarity.py tests/test_hard_positive.py -k graph_safe
stage tests_supcon_lean 60 env ANCHOR_KERNELS_AUTOTUNE=0 python3 -m pytest -q -ra -x -m gpu \
    tests/test_supcon_triton.py -k "not dtype0"
# The same loss split by where each issue's goal lies: the batch sizes people train with
# against eager and torch.compile (host cost), the large ones against sdpa-flash (work per
# logit) with plain SupCon and beta = 1; then the size rules measured (tune) and the attack.
stage sweep_small 95 python3 -m benchmarks --ops supcon --dtypes bfloat16 \
    --sizes 512 1024 2048 4096 8192 16384 --passes fwd+bwd --candidates triton eager compile \
    --time-budget 80 --no-fit --no-progress --no-plot --out "$RES/supcon_small.json"
stage sweep_large ${LARGE_LIMIT:-90} python3 -m benchmarks --ops supcon --dtypes bfloat16 \
    --sizes ${LARGE_SIZES:-16384 32768 65536 131072} --passes fwd bwd fwd+bwd \
    --candidates ${LARGE_CANDIDATES:-triton sdpa-flash} --time-budget ${LARGE_BUDGET:-75} --no-fit --no-progress --no-plot --out "$RES/supcon_large.json"
stage sweep_large_beta1 45 python3 -m benchmarks --ops supcon --dtypes bfloat16 \
    --sizes 16384 65536 --passes fwd+bwd --candidates triton --set supcon.beta=1.0 \
    --time-budget 40 --no-fit --no-progress --no-plot --out "$RES/supcon_large_beta1.json"
# Two sets (N/8 anchors against N rows, a distributed process's shape): the backward's dK
# programs on wgmma.
stage sweep_two_sets 60 python3 -m benchmarks --ops supcon --dtypes bfloat16 --sizes 16384 65536 \
    --passes fwd bwd fwd+bwd --candidates triton sdpa-flash --set supcon.anchors=0.125 \
    --time-budget 50 --no-fit --no-progress --no-plot --out "$RES/supcon_two_sets.json"
# The attack at each batch size in its own stage: 4096 did not fit one shared budget.
for n in 512 4096; do
    stage "bench_attack_$n" 120 python3 -m benchmarks --ops attack --dtypes bfloat16 --sizes $n \
        --time-budget 110 --no-fit --no-progress --no-plot --out "$RES/attack_$n.json"
done
stage runner_sweep 140 python3 -m benchmarks --gpu-sweep --time-budget 60 --fit-budget 30 \
    --no-progress --out "$RES/sweep_h100.json"

# Tables last (what comes back of the output is its end).
for f in "$RES"/supcon_cuda.json "$RES"/supcon_small.json "$RES"/supcon_large.json "$RES"/supcon_large_beta1.json "$RES"/supcon_two_sets.json "$RES"/attack_512.json "$RES"/attack_4096.json; do
    [[ -f "$f" ]] && python3 -m benchmarks --replot "$f" --no-plot 2>&1 | grep -v "^wrote"
done
grep -A10 "interleaved rounds" "$LOG" || true
grep -A49 "sm90 ran" "$LOG" || true  # the Hopper smoke table
echo; cat "$SUMMARY"; pack
