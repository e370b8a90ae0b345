"""Figures for people (matplotlib, drawn off-screen): the training curves and the reconstruction grid of an
evaluation. Written whole (pipeline.storage), like every other output."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np

from pipeline.storage import atomic_write_bytes


def _figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def training_curves(metrics: Path, out: Path, title: str = "", second: str = "val/psnr",
                    second_label: str = "held-out PSNR (dB)") -> list[str]:
    """From a run's metrics.jsonl: the training loss against the step (log scale) and, where validation ran, the
    held-out metric `second` (the PSNR; the probe's validation loss) on a second axis. For the PSNR, the curves of
    the EMA weights (what evaluate, encode and export use by default, so what a headline PSNR is) and of the raw
    weights being trained, each labelled. Returns the legend's labels."""
    plt = _pyplot()
    rows = [json.loads(ln) for ln in Path(metrics).read_text().splitlines() if ln.strip()] if Path(metrics).is_file() else []
    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    ema = "val_ema/psnr" if second == "val/psnr" else None  # the probe draws its own metric, one curve
    curves = [(label, [(r["step"], r[key]) for r in rows if key in r], style) for key, label, style in (
        (ema, f"{second_label}, EMA weights (evaluate's default)", dict(color="tab:blue", lw=1.6)),
        (second, f"{second_label}, raw weights" if ema else second_label,
         dict(color="tab:cyan", lw=1.0, ls="--") if ema else dict(color="tab:blue", lw=1.2)))]
    curves = [c for c in curves if c[1]]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    if train:
        ax.plot(*zip(*train), color="tab:red", lw=1.5, label="training loss")
        if min(v for _, v in train) > 0:
            ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss" + (" (log scale)" if train and ax.get_yscale() == "log" else ""), color="tab:red")
    ax.grid(True, which="both", alpha=0.3)
    handles = ax.get_legend_handles_labels()
    if curves:
        ax2 = ax.twinx()
        for label, points, style in curves:
            ax2.plot(*zip(*points), marker="o", ms=3, label=label, **style)
        ax2.set_ylabel(second_label, color="tab:blue")
        h2 = ax2.get_legend_handles_labels()
        handles = (handles[0] + h2[0], handles[1] + h2[1])
    if handles[0]:
        ax.legend(*handles, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=len(handles[0]), fontsize=8,
                  frameon=False)  # below the axes: never over a curve
    if not train and not curves:
        ax.text(0.5, 0.5, "nothing logged yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title or "training", fontsize=10)
    atomic_write_bytes(out, _figure_bytes(fig))
    return list(handles[1])


def reconstruction_grid(images: np.ndarray, reconstructions: np.ndarray, psnr: list[float], names: list[str],
                        out: Path, title: str = "", columns: int = 6, tile: float = 1.6) -> None:
    """Every image (uint8 [N, H, W, 3]) above its reconstruction, labelled with its name and PSNR: one mosaic drawn
    on one axes (a subplot per tile took 2-3x as long to render), the labels in the white band above each tile."""
    plt = _pyplot()
    n, h, w = len(images), images.shape[1], images.shape[2]
    cols = min(columns, max(n, 1))
    rows = max(1, math.ceil(n / cols))
    per_inch = w / (0.9 * tile)  # image pixels per inch: a tile is 90% of its cell's width
    band, gap = math.ceil(0.32 * per_inch), math.ceil(0.1 * tile * per_inch)  # room for two 7-pt lines; margins
    cell_w, cell_h = w + gap, h + band
    mosaic = np.full((2 * rows * cell_h + gap, cols * cell_w, 3), 255, np.uint8)
    head = 0.4 if title else 0.0  # inches above the mosaic for the title
    fig = plt.figure(figsize=(mosaic.shape[1] / per_inch, mosaic.shape[0] / per_inch + head))
    ax = fig.add_axes((0, 0, 1, 1 - head / fig.get_figheight()))
    ax.axis("off")
    for i in range(n):
        r, c = divmod(i, cols)
        for k, (image, label) in enumerate(((images[i], f"{names[i]}\ninput"),
                                            (reconstructions[i], f"reconstruction, {psnr[i]:.1f} dB"))):
            y, x = (2 * r + k) * cell_h + band, c * cell_w + gap // 2
            mosaic[y:y + h, x:x + w] = image
            ax.text(x + w / 2, y - 1, label, ha="center", va="bottom", fontsize=7)
    ax.imshow(mosaic, interpolation="nearest")
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.15 / fig.get_figheight(), va="top")
    atomic_write_bytes(out, _figure_bytes(fig))  # tight: a title or name wider than few tiles is not cut
