"""Per-epoch metrics as JSON lines and CSV, and a PNG of the curves.

``metrics.jsonl`` is appended (one object per epoch, fsynced); ``metrics.csv`` is rewritten
from all rows each epoch (atomically) so that its columns are the union of every row's keys.
On resume the rows of epochs after the checkpoint are dropped: a run killed between writing
a row and writing its checkpoint repeats that epoch, and the files keep one row per epoch.
"""

from __future__ import annotations

import csv
import json
import math
import os

JSONL_NAME, CSV_NAME, PLOT_NAME, FINAL_NAME = "metrics.jsonl", "metrics.csv", "curves.png", "final.json"


class MetricsLog:
    def __init__(self, out_dir: str, keep_through_epoch: int | None = None):
        """Open the log of ``out_dir``. ``keep_through_epoch=None`` starts afresh; an int
        keeps the rows with ``epoch <= keep_through_epoch`` (resume)."""
        self.out_dir = out_dir
        self.jsonl = os.path.join(out_dir, JSONL_NAME)
        self.csv = os.path.join(out_dir, CSV_NAME)
        os.makedirs(out_dir, exist_ok=True)
        self.rows: list[dict] = []
        if keep_through_epoch is not None and os.path.isfile(self.jsonl):
            self.rows = [r for r in read_jsonl(self.jsonl) if r.get("epoch", 0) <= keep_through_epoch]
        _write_atomic(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))
        self._write_csv()

    def append(self, row: dict) -> None:
        row = {k: _plain(v) for k, v in row.items()}
        self.rows.append(row)
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._write_csv()

    def _write_csv(self) -> None:
        columns: list[str] = []
        for row in self.rows:
            columns += [k for k in row if k not in columns]
        lines = _CsvLines()
        writer = csv.DictWriter(lines, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        _write_atomic(self.csv, "".join(lines.lines))


class _CsvLines:
    def __init__(self):
        self.lines: list[str] = []

    def write(self, s: str) -> None:
        self.lines.append(s)


def _plain(v):
    """JSON-safe scalars: NaN/inf become strings rather than invalid JSON."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
    """Rows of a metrics file; a torn last line (a kill mid-write) is skipped."""
    rows = []
    with open(path) as fh:
        for line in fh:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def write_json(path: str, obj: dict) -> None:
    _write_atomic(path, json.dumps({k: _plain(v) for k, v in obj.items()}, indent=2) + "\n")


def plot_curves(rows: list[dict], path: str) -> None:
    """Loss parts, accuracies, throughput and the step-time split against the epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = _keys(rows)
    panels = [
        ("loss", [k for k in keys if k.startswith("loss") and not k.endswith("_ms")]),
        ("accuracy", [k for k in keys if k.endswith("_acc")]),
        ("images/s", ["images_per_s"]),
        ("ms per step", ["step_ms", "attack_ms", "fwd_bwd_ms", "loss_ms"]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            pts = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _keys(rows: list[dict]) -> list[str]:
    out: list[str] = []
    for r in rows:
        out += [k for k in r if k not in out]
    return out
