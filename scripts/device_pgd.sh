#!/usr/bin/env bash
# One device call for PGD: tier-2 tests of the step, random start and attack, then the GB/s
# table and the attack overhead. Results land in $OUT (default /tmp/out).
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/pgd_env.txt"
# the C++/CUDA extension is built once (JIT, cached under build/ext); the tests then load it
timeout 540 python3 -c "import anchor_kernels._ext as e; print('extension:', e.load() or 'loaded', '| cuda:', e.cuda_error() or 'loaded')" 2>&1 | tail -5
timeout 300 python3 -m pytest -q -ra -x tests/test_pgd.py tests/test_attacks.py > "$OUT/pgd_pytest.log" 2>&1; echo "pytest rc=$?"
tail -15 "$OUT/pgd_pytest.log"
PYTHONPATH=. timeout 240 python3 benchmarks/bench_pgd.py --gpu --out "$OUT/pgd_gpu.json" > "$OUT/pgd_bench.log" 2>&1; echo "bench rc=$?"
tail -30 "$OUT/pgd_bench.log"
