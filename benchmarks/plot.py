"""Plot a results document: per (op, dtype) a row of panels (time of each pass, then forward+
backward peak memory) against the batch size, log-log, one line per candidate (the median,
with the 20-80 % band shaded; line style by kind: solid backend, dashed baseline, dotted
roofline neighbour)."""

from __future__ import annotations

from pathlib import Path

from .records import PASSES
from .results import full_pass

_STYLE = {"backend": "-", "baseline": "--", "neighbour": ":", "interpreter": "-."}


def plot(doc: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    rows = doc["results"]
    colour = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(r["candidate"]
                                                                          for r in rows))}
    groups = sorted({(r["op"], r["dtype"]) for r in rows})
    passes = [p for p in PASSES if any(r["pass"] == p for r in rows)]
    fig, axes = plt.subplots(max(1, len(groups)), len(passes) + 1, squeeze=False,
                             figsize=(4.2 * (len(passes) + 1), 3.4 * max(1, len(groups))))
    for g, (op, dtype) in enumerate(groups):
        mine = [r for r in rows if (r["op"], r["dtype"]) == (op, dtype) and r["status"] == "ok"]
        full = full_pass([r for r in rows if r["op"] == op])
        panels = [(p, "ms", f"{p} time (ms)") for p in passes] + [
            (full, "peak_mem_bytes", f"{full} peak memory (MiB)")]
        for ax, (pass_, key, label) in zip(axes[g], panels):
            for name in dict.fromkeys(r["candidate"] for r in mine):
                pts = sorted((r["n"], r) for r in mine
                             if r["candidate"] == name and r["pass"] == pass_ and r[key] > 0)
                if not pts:
                    continue
                xs = [n for n, _ in pts]
                kind = pts[0][1]["kind"]
                if key == "ms":
                    ax.fill_between(xs, [r["ms_p20"] for _, r in pts],
                                    [r["ms_p80"] for _, r in pts], color=colour[name], alpha=0.15,
                                    linewidth=0)
                    ys = [r["ms"] for _, r in pts]
                else:
                    ys = [r[key] / 2**20 for _, r in pts]
                ax.plot(xs, ys, _STYLE.get(kind, "-"), color=colour[name], marker="o",
                        markersize=3, label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{op} {dtype}: {label}", fontsize=9)
            ax.set_xlabel("batch size N")
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
            else:  # every candidate skipped, refused or failed here: the table says why
                ax.text(0.5, 0.5, "nothing measured", ha="center", va="center",
                        transform=ax.transAxes, color="grey")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.minorticks_off()
                ax.grid(False, which="both")
    meta = doc["meta"]
    fig.suptitle(f"{meta['device_name']} | torch {meta['torch']} | {meta['date']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
