#!/usr/bin/env bash
# One device call: environment, tier-2 tests of the core loss, and its GPU table.
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/env.txt"
ANCHOR_KERNELS_AUTOTUNE=0 timeout 240 python3 -m pytest -q -ra -x tests/test_supcon_triton.py tests/test_supcon_api.py > "$OUT/pytest_core.log" 2>&1; echo "pytest rc=$?"
tail -15 "$OUT/pytest_core.log"
PYTHONPATH=. timeout 200 python3 benchmarks/supcon_gpu_table.py --out "$OUT/supcon_gpu_bf16.json" > "$OUT/bench_core.log" 2>&1; echo "bench rc=$?"
PYTHONPATH=. timeout 60 python3 benchmarks/supcon_gpu_table.py --n 16384 --beta 2.0 --backends triton eager --out "$OUT/supcon_gpu_bf16_beta2.json" > "$OUT/bench_core_beta.log" 2>&1
tail -12 "$OUT/bench_core.log"; tail -4 "$OUT/bench_core_beta.log"
