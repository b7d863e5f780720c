"""Results: the run's environment, the JSON document, its schema check, the long-format CSV
and the text table printed at the end."""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from .records import FIT_STOPS, KINDS, PASSES, STATUSES, Fit, Measurement

SCHEMA = "anchor_kernels-benchmarks/1"

TIMER = {
    "cuda": "do_bench's recipe: CUDA events around each call after a warm-up of warmup_ms, "
            "L2 flushed before each, max(min_reps, rep_ms / estimate) calls, gc paused; bwd: "
            "the events around the backward alone of a fresh untimed forward; "
            "torch.quantile 0.5 / 0.2 / 0.8",
    "cpu": "time.perf_counter per call after a warm-up of warmup_ms; rep_ms / estimate calls "
           "(at least min_reps); bwd times the backward alone of a fresh untimed forward; "
           "gradients reset outside the timed region, gc paused; torch.quantile 0.5 / 0.2 / 0.8",
}
MEMORY = {
    "cuda": "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus "
            "memory_allocated before the call",
    "cpu": "peak of the running sum of PyTorch CPU-allocator events reported to "
           "torch.profiler (profile_memory=True) during one call, on the calling thread",
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10)
        sha = head.stdout.strip()
        if head.returncode != 0 or not re.fullmatch(r"[0-9a-f]{40}", sha):
            return None  # not a git checkout (a copied tree, an installed package)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device, argv: list[str]) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import anchor_kernels
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "anchor_kernels": anchor_kernels.__version__,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "command": " ".join(["python", "-m", "benchmarks", *argv]),
        "timer": TIMER[device.type],
        "memory": MEMORY[device.type],
    }


def document(meta: dict, config: dict, candidates: dict, rows: list[Measurement],
             fits: list[Fit]) -> dict:
    def as_dict(r):
        d = dataclasses.asdict(r)
        if "pass_" in d:
            d["pass"] = d.pop("pass_")
        if "probes" in d:
            d["probes"] = list(d["probes"])
        return d
    return {"schema": SCHEMA, "meta": meta, "config": config, "candidates": candidates,
            "results": [as_dict(r) for r in rows], "largest_fit": [as_dict(f) for f in fits]}


_META_KEYS = {"date": str, "device": str, "device_name": str, "torch": str, "python": str,
              "timer": str, "memory": str}
_ROW_KEYS = {"op": str, "candidate": str, "kind": str, "pass": str, "dtype": str, "n": int,
             "m": int, "d": int, "status": str, "reason": str}
_OK_FIGURES = ("ms", "ms_p20", "ms_p80", "peak_mem_bytes")
_FIT_KEYS = {"op": str, "candidate": str, "kind": str, "dtype": str, "largest_n": (int, type(None)),
             "peak_mem_bytes": (int, type(None)), "stopped": str, "detail": str, "probes": list}


def validate(doc: dict) -> None:
    """Raise ValueError naming the first thing in ``doc`` that breaks the schema."""
    def need(obj, keys, where):
        for key, typ in keys.items():
            if key not in obj:
                raise ValueError(f"{where}: missing key {key!r}")
            if not isinstance(obj[key], typ) or (typ is int and isinstance(obj[key], bool)):
                raise ValueError(f"{where}: {key!r} should be {typ}, got {obj[key]!r}")

    if doc.get("schema") != SCHEMA:
        raise ValueError(f"schema should be {SCHEMA!r}, got {doc.get('schema')!r}")
    need(doc, {"meta": dict, "config": dict, "candidates": dict, "results": list,
               "largest_fit": list}, "document")
    need(doc["meta"], _META_KEYS, "meta")
    for i, row in enumerate(doc["results"]):
        where = f"results[{i}]"
        need(row, _ROW_KEYS, where)
        for key, allowed in (("status", STATUSES), ("pass", PASSES), ("kind", KINDS)):
            if row[key] not in allowed:
                raise ValueError(f"{where}: {key} {row[key]!r} is not one of {allowed}")
        if row["status"] == "ok":
            for key in _OK_FIGURES:
                if not isinstance(row.get(key), (int, float)) or row[key] < 0:
                    raise ValueError(f"{where}: ok row needs a non-negative {key}, got {row.get(key)!r}")
            if not row["ms_p20"] <= row["ms"] <= row["ms_p80"]:
                raise ValueError(f"{where}: quantiles out of order: {row['ms_p20']}, {row['ms']}, "
                                 f"{row['ms_p80']}")
        elif not row["reason"]:
            raise ValueError(f"{where}: a {row['status']} row needs a reason")
    for i, fit in enumerate(doc["largest_fit"]):
        need(fit, _FIT_KEYS, f"largest_fit[{i}]")
        if fit["stopped"] not in FIT_STOPS:
            raise ValueError(f"largest_fit[{i}]: stopped {fit['stopped']!r} is not one of {FIT_STOPS}")


def write_json(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)  # a crash never leaves half a file


CSV_COLUMNS = ("op", "candidate", "kind", "pass", "dtype", "n", "m", "d", "status", "metric",
               "unit", "value_50", "value_20", "value_80", "reason", "device_name", "date")


def write_csv(doc: dict, path: Path) -> None:
    """Long format: one line per (measurement, metric). Throughput quantiles are those of the
    time turned into a rate (value_20 comes from the 80 % time)."""
    meta = doc["meta"]
    lines = []
    for r in doc["results"]:
        base = {k: r[k] for k in ("op", "candidate", "kind", "pass", "dtype", "n", "m", "d",
                                  "status", "reason")}
        base.update(device_name=meta["device_name"], date=meta["date"])
        if r["status"] != "ok":
            lines.append({**base, "metric": "status"})
            continue
        lines.append({**base, "metric": "time", "unit": "ms", "value_50": r["ms"],
                      "value_20": r["ms_p20"], "value_80": r["ms_p80"]})
        for key, unit, scale in (("tflops", "TFLOP/s", 1e12), ("gbps", "GB/s", 1e9)):
            if r.get(key):
                work = r[key] * r["ms"]  # rate x time, so the quantiles follow the time's
                lines.append({**base, "metric": "throughput", "unit": unit, "value_50": r[key],
                              "value_20": work / r["ms_p80"], "value_80": work / r["ms_p20"]})
        lines.append({**base, "metric": "peak_memory", "unit": "bytes",
                      "value_50": r["peak_mem_bytes"]})
    for f in doc["largest_fit"]:
        lines.append({"op": f["op"], "candidate": f["candidate"], "kind": f["kind"],
                      "pass": "fwd+bwd", "dtype": f["dtype"], "d": f.get("d"), "n": f["largest_n"],
                      "status": f["stopped"], "metric": "largest_n", "unit": "rows",
                      "value_50": f["largest_n"], "reason": f["detail"],
                      "device_name": meta["device_name"], "date": meta["date"]})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(lines)


def _ran_somewhere(candidate: str, op_rows: list[dict]) -> bool:
    """False for a candidate that cannot run this op here (the cpu backend on a GPU run),
    even where a budget skipped it before it was asked; it is listed under "not run"."""
    statuses = {r["status"] for r in op_rows if r["candidate"] == candidate}
    return not (statuses <= {"unsupported", "skipped"} and "unsupported" in statuses)


def full_pass(rows: list[dict]) -> str:
    """The pass that runs the whole op: forward+backward, or the forward of an op with no
    backward."""
    return "fwd+bwd" if any(r["pass"] == "fwd+bwd" for r in rows) else "fwd"


def _cell(row: dict | None, key: str, eager: dict | None) -> str:
    if row is None:
        return "-"
    if row["status"] != "ok":
        return {"unsupported": "n/a", "skipped": "skip", "oom": "OOM", "error": "error"}[row["status"]]
    if key == "ms":
        text = f"{row['ms']:.3g}"
        if eager and eager["status"] == "ok" and row["candidate"] != "eager":
            text += f" {eager['ms'] / row['ms']:.2g}x"
        return text
    if key in ("tflops", "gbps"):
        return f"{row[key]:.3g}" if row.get(key) else "-"
    return f"{row['peak_mem_bytes'] / 2**20:.3g}"


def table(doc: dict) -> str:
    """Blocks of N x candidate: time per pass (with speed-up over eager), then TFLOP/s or GB/s
    and peak memory of the whole op; then the largest-batch search and every refusal reason."""
    rows = doc["results"]
    out = [f"{doc['meta']['device_name']} | torch {doc['meta']['torch']} | {doc['meta']['date']}"]
    groups = sorted({(r["op"], r["dtype"]) for r in rows})
    for op, dtype in groups:
        mine = [r for r in rows if (r["op"], r["dtype"]) == (op, dtype)]
        names = list(dict.fromkeys(r["candidate"] for r in mine))
        shown = [c for c in names if _ran_somewhere(c, [r for r in rows if r["op"] == op])]
        sizes = sorted({r["n"] for r in mine})
        full = full_pass(mine)
        blocks = [(p, "ms", f"{p} ms (median; Nx = speed-up over eager)") for p in PASSES]
        blocks += [(full, key, f"{full} {unit}") for key, unit in
                   (("tflops", "TFLOP/s"), ("gbps", "GB/s")) if any(r.get(key) for r in mine)]
        blocks.append((full, "mem", f"{full} peak MiB"))
        for pass_, key, title in blocks:
            if not any(r["pass"] == pass_ for r in mine):
                continue
            lookup = {(r["n"], r["candidate"]): r for r in mine if r["pass"] == pass_}
            out.append(f"\n{op} {dtype}: {title}")
            body = [["N", *shown]]
            for n in sizes:
                eager = lookup.get((n, "eager"))
                body.append([str(n), *(_cell(lookup.get((n, c)), key, eager) for c in shown)])
            out.extend(_columns(body))
    if doc["largest_fit"]:
        out.append("\nlargest batch that fits (forward+backward, doubling)")
        body = [["op", "candidate", "dtype", "largest N", "peak MiB", "stopped: why"]]
        for f in doc["largest_fit"]:
            peak = f"{f['peak_mem_bytes'] / 2**20:.3g}" if f["peak_mem_bytes"] is not None else "-"
            body.append([f["op"], f["candidate"], f["dtype"], str(f["largest_n"] or "-"), peak,
                         f"{f['stopped']}: {f['detail']}"])
        out.extend(_columns(body))
    reasons = {(r["op"], r["candidate"], r["status"], r["reason"]) for r in rows
               if r["status"] in ("unsupported", "error")}
    if reasons:
        out.append("\nnot run")
        out.extend(f"  {op} {c} ({status}): {why}" for op, c, status, why in sorted(reasons))
    return "\n".join(out)


def _columns(body: list[list[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in body) for i in range(len(body[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in body]
