"""Run settings: per-device defaults, the presets, and how the command line overrides them
(explicit argument > preset > device default)."""

from __future__ import annotations

from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16", "half": "float16", "fp64": "float64",
          "float64": "float64"}

# Per-device defaults, then what each preset changes.
DEFAULTS = {
    "cpu": dict(dtypes=["float32"], warmup_ms=100, rep_ms=500, min_reps=5, max_call_s=10,
                mem_cap_gb=4.0, time_budget=900, fit_max_n=1 << 16, fit_max_call_s=10,
                fit_budget=180),
    "cuda": dict(dtypes=["bfloat16"], warmup_ms=25, rep_ms=100, min_reps=20, max_call_s=2,
                 mem_cap_gb=None, time_budget=600, fit_max_n=1 << 22, fit_max_call_s=5,
                 fit_budget=120),
}
PRESETS = {
    "quick": {
        # The loss only (the other ops with --ops): with torch.compile's first compilation
        # on a cold cache (about 25 s here), under two minutes on 2 cores.
        "cpu": dict(ops=["supcon"], warmup_ms=50, rep_ms=250, min_reps=5, max_call_s=3,
                    mem_cap_gb=2.0, time_budget=75, fit_max_n=1 << 15, fit_max_call_s=1.0,
                    fit_budget=20),
        "cuda": dict(ops=["supcon"], warmup_ms=10, rep_ms=50, time_budget=90,
                     fit_max_n=1 << 20, fit_max_call_s=1, fit_budget=30),
    },
    "gpu_sweep": {
        "cuda": dict(ops=["supcon"], sizes=[512 << k for k in range(9)], dim=128,
                     dtypes=["bfloat16", "float32"], warmup_ms=20, rep_ms=60, max_call_s=0.5,
                     time_budget=190, fit_max_call_s=3, fit_budget=70),
    },
}


def merge(args, device_type: str) -> dict:
    """Merge: explicit argument > preset > device default."""
    preset = "quick" if args.quick else "gpu_sweep" if args.gpu_sweep else None
    merged = dict(DEFAULTS[device_type])
    if preset:
        merged.update(PRESETS[preset].get(device_type, {}))
    for key in ("ops", "sizes", "dim", "dtypes", "warmup_ms", "rep_ms", "min_reps",
                "max_call_s", "mem_cap_gb", "time_budget", "fit_max_n", "fit_max_call_s",
                "fit_budget"):
        value = getattr(args, key)
        if value is not None:
            merged[key] = split(value) if key in ("ops", "dtypes") else value
    merged["preset"] = preset
    return merged


def split(values) -> list[str]:
    """Arguments given as several words, commas, or both: ``--dtypes bf16,fp32 fp16``."""
    return [v for text in values or () for v in text.split(",") if v]
