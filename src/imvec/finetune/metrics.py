"""Per-epoch metrics of a run: ``metrics.csv``, ``metrics.json`` and ``metrics.png``.

All three are rewritten from the full history after every epoch (atomically), so they
always agree with the last checkpoint, also after a resume.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from imvec.finetune.state import atomic_write_bytes, atomic_write_text

__all__ = ["COLUMNS", "plot_metrics", "write_metrics"]

COLUMNS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds")
log = logging.getLogger("imvec.finetune")


def write_metrics(run_dir: Path, history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """CSV (one row per epoch), JSON (summary + rows) and the PNG plot."""
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})
    atomic_write_text(run_dir / "metrics.csv", text.getvalue())
    atomic_write_text(run_dir / "metrics.json",
                      json.dumps({**summary, "epochs": history}, indent=2) + "\n")
    png = plot_metrics(history, summary.get("title", ""))
    if png is not None:
        atomic_write_bytes(run_dir / "metrics.png", png)


def plot_metrics(history: list[dict[str, Any]], title: str = "") -> bytes | None:
    """PNG bytes of loss and accuracy per epoch (train and validation); None without
    matplotlib (``pip install 'imvec[finetune]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("no metrics.png: matplotlib is missing (pip install 'imvec[finetune]')")
        return None
    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(8, 3.2), dpi=100)
    for axis, name in zip(figure.subplots(1, 2), ("loss", "accuracy"), strict=True):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = [_number(row.get(f"{split}_{name}")) for row in history]
            if any(not math.isnan(v) for v in values):
                axis.plot(epochs, values, style, markersize=3, label=split)
        axis.set_xlabel("epoch")
        axis.set_title(name)
        axis.grid(alpha=0.3)
        axis.legend()
        if name == "accuracy":
            axis.set_ylim(0, 1.02)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)
