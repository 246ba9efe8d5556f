"""Figures of step 05 (train): the train/validation split and the learning curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from helpers.config import ClassMap
from helpers.metrics import headline_name
from helpers.split import SPLIT_COLUMN


def plot_history(history: pd.DataFrame | str | Path, headline: str | None = None, class_map: ClassMap | None = None,
                 averaged: bool = False):
    """Figure: training loss and validation IoU (per class, mean) against epoch.

    ``headline`` (drawn thick): a class name; None = the class map's headline class.
    ``averaged``: the run validated a moving average of the weights (05's ``ema_momentum``),
    while the loss is the network's own: the axis labels say so.
    """
    import matplotlib.pyplot as plt

    h = pd.read_csv(history) if isinstance(history, (str, Path)) else history
    if headline is None and class_map is not None:
        headline = headline_name(class_map)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(h["epoch"], h["loss"], "o-", label="training loss" + (" (own weights)" if averaged else ""))
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss (labelled pixels)")
    a1.legend()
    for col in [c for c in h.columns if c.startswith("val_iou_")]:
        name = col[len("val_iou_"):]
        color = None
        if class_map is not None and name in class_map.names:
            color = np.array(class_map.by_label(class_map.label_of(name)).color) / 255
        a2.plot(h["epoch"], h[col], "o-" if name == headline else ".--", lw=2.5 if name == headline else 1,
                label=name, color=color)
    if "val_mean_iou" in h:
        a2.plot(h["epoch"], h["val_mean_iou"], "k-", lw=1, label="mean")
    a2.set_ylim(0, 1)
    a2.set_xlabel("epoch")
    a2.set_ylabel("validation IoU (labelled pixels" + ("; weight average)" if averaged else ")"))
    a2.legend(fontsize=8)
    if "phase" in h and (h["phase"] == "warm-up").any():
        x = h.loc[h["phase"] == "warm-up", "epoch"].max() + 0.5
        for a in (a1, a2):
            a.axvline(x, color="grey", ls=":", lw=1)
    fig.tight_layout()
    return fig


def _held_shares(blocks: pd.DataFrame, px_cols: list[str]) -> str:
    """"Tumor 16%, Stroma 0%, ...": each labelled class's share of pixels in ``val`` blocks."""
    total = blocks[px_cols].sum()
    held = blocks.loc[blocks[SPLIT_COLUMN] == "val", px_cols].sum()
    return ", ".join(f"{c[3:]} {100 * held[c] / total[c]:.0f}%" for c in px_cols if total[c])


def plot_split(split: pd.DataFrame, max_slides: int = 4):
    """Figure: tile footprints per slide coloured by split (train / val / excluded).

    For ``split_by="pixels"`` (rows with ``group == "pixels"``: blocks of labelled pixels,
    :func:`helpers.split.preview_split`) the blocks are drawn instead, and each title gives
    every class's held-out share of its labelled pixels: a class at 0 % would never be
    validated.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    pixels = "group" in split.columns and (split["group"] == "pixels").all() and len(split)
    colors = {"train": "tab:blue", "val": "tab:orange"} if pixels else \
        {"train": "tab:blue", "val": "tab:orange", "excluded": "lightgrey"}
    px_cols = [c for c in split.columns if c.startswith("px_")]
    slides = list(split["slide"].unique())[:max_slides]
    fig, axes = plt.subplots(1, max(1, len(slides)), figsize=(5 * max(1, len(slides)), 5.4), squeeze=False)
    for ax, slide in zip(axes[0], slides):
        sub = split[split["slide"] == slide]
        for r in sub.sort_values(SPLIT_COLUMN, key=lambda s: s.eq("val")).itertuples():  # val drawn on top
            ax.add_patch(Rectangle((r.x, r.y), r.w, r.h, facecolor=colors.get(getattr(r, SPLIT_COLUMN), "white"),
                                   edgecolor="none" if pixels else "k", lw=0.3, alpha=0.75))
        ax.set_xlim(sub["x"].min(), (sub["x"] + sub["w"]).max())
        ax.set_ylim((sub["y"] + sub["h"]).max(), sub["y"].min())
        ax.set_aspect("equal")
        counts = sub[SPLIT_COLUMN].value_counts().to_dict()
        title = f"{slide}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        if pixels:
            title = f"{slide}: {len(sub)} blocks of labelled pixels\nheld out: " + _held_shares(sub, px_cols)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("x (level-0 px)")
    axes[0][0].legend(handles=[Patch(color=c, label=k) for k, c in colors.items()], loc="upper right", fontsize=8)
    if pixels:
        fig.suptitle(f"all {split['slide'].nunique()} slides, labelled pixels held out for validation: "
                     + _held_shares(split, px_cols), fontsize=10)
    fig.tight_layout()
    return fig
