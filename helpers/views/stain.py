"""Figures of step 02 (stain normalization): reference, stain vectors, before/after."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from helpers.stain import StainNormalizer, lab_distance, stain_colors
from helpers.tissue import stain_tissue_mask, tissue_fraction


def plot_reference(normalizer: StainNormalizer, image: np.ndarray | None = None):
    """Figure: the reference tile, its tissue mask and the target stain colours."""
    import matplotlib.pyplot as plt

    image = normalizer.reference_image if image is None else image
    fig, axes = plt.subplots(1, 3, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1, 0.7]})
    if image is not None:
        axes[0].imshow(image)
        axes[1].imshow(stain_tissue_mask(image, normalizer.luminosity_threshold), cmap="gray")
        axes[1].set_title(f"tissue used for fitting ({tissue_fraction(image, normalizer.luminosity_threshold):.0%})", fontsize=9)
    axes[0].set_title(f"reference ({normalizer.method})", fontsize=9)
    for ax in axes[:2]:
        ax.axis("off")
    _draw_stains(axes[2], normalizer)
    fig.tight_layout()
    return fig


def _draw_stains(ax, normalizer: StainNormalizer) -> None:
    ax.axis("off")
    if normalizer.stain_matrix is not None:
        cols = stain_colors(normalizer.stain_matrix, 1.0)
        for k, (name, c) in enumerate(zip(("Hematoxylin", "Eosin"), cols)):
            ax.add_patch(plt_rect((0.05, 0.55 - 0.45 * k), 0.35, 0.35, c / 255))
            od = normalizer.stain_matrix[k]
            ax.text(0.45, 0.72 - 0.45 * k, f"{name}\nOD r,g,b = {od[0]:.2f}, {od[1]:.2f}, {od[2]:.2f}\n"
                    f"max conc. {normalizer.max_concentrations[k]:.2f}", fontsize=8, va="center")
        ax.set_title("target stain vectors", fontsize=9)
    elif normalizer.lab_mean is not None:
        m, s = normalizer.lab_mean, normalizer.lab_std
        ax.text(0.0, 0.5, f"target LAB of tissue\nmean L,a,b = {m[0]:.1f}, {m[1]:.1f}, {m[2]:.1f}\n"
                f"std  L,a,b = {s[0]:.1f}, {s[1]:.1f}, {s[2]:.1f}", fontsize=9, va="center")
    else:
        ax.text(0.0, 0.5, "method 'none': tiles are not changed", fontsize=9, va="center")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)


def plt_rect(xy: tuple[float, float], w: float, h: float, color: Any):
    from matplotlib.patches import Rectangle

    return Rectangle(xy, w, h, color=color, ec="k", lw=0.5)


def plot_stain_vectors(normalizer: StainNormalizer, slides_json: str | Path | dict | None = None):
    """Figure: OD components of the target stain vectors and of each slide's estimate (per-slide mode)."""
    import matplotlib.pyplot as plt

    from helpers.io import read_json

    info = read_json(slides_json) if isinstance(slides_json, (str, Path)) else (slides_json or {})
    mats = {"target (reference)": normalizer.stain_matrix}
    for name, d in (info.get("slides") or {}).items():
        if d.get("stain_matrix") is not None:
            mats[name] = np.asarray(d["stain_matrix"])
    mats = {k: v for k, v in mats.items() if v is not None}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    if not mats:
        for ax in axes:
            ax.axis("off")
        axes[0].text(0, 0.5, f"method {normalizer.method!r} has no stain vectors", fontsize=10)
        return fig
    width = 0.8 / len(mats)
    for k, stain in enumerate(("Hematoxylin", "Eosin")):
        ax = axes[k]
        for j, (name, m) in enumerate(mats.items()):
            ax.bar(np.arange(3) + j * width, m[k], width, color=stain_colors(m, 1.0)[k] / 255, ec="k", lw=0.5,
                   label=name)
        ax.set_xticks(np.arange(3) + 0.4 - width / 2, ["R", "G", "B"])
        ax.set_ylabel("optical density (unit vector)")
        ax.set_title(f"{stain} stain vector (bar colour = stain colour)", fontsize=9)
    axes[1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def plot_before_after(manifest: pd.DataFrame | str | Path, workdir: str | Path, n: int = 6, seed: int = 0):
    """Figure: raw tiles (top) above their normalized versions (bottom), one column per tile."""
    import matplotlib.pyplot as plt

    from helpers.io import read_image, read_manifest

    df = read_manifest(manifest) if isinstance(manifest, (str, Path)) else manifest
    workdir = Path(workdir)
    n = min(n, len(df))
    rows = df.sample(n, random_state=seed) if len(df) > n else df
    fig, axes = plt.subplots(2, max(n, 1), figsize=(2.4 * max(n, 1), 5.2), squeeze=False)
    for j, (_, r) in enumerate(rows.iterrows()):
        raw_col = "image_raw" if "image_raw" in r else "image"
        for i, (col, label) in enumerate(((raw_col, "before"), ("image", "after"))):
            ax = axes[i, j]
            ax.imshow(read_image(workdir / r[col]))
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label)
            if i == 0:
                ax.set_title(f"{r['slide']}\nx={r.get('x', '?')}, y={r.get('y', '?')}", fontsize=7)
            if i == 1 and str(r.get("stain_status", "normalized")).startswith("passthrough"):
                ax.set_title("unchanged (too little tissue)", fontsize=7, color="tab:red")
    for ax in axes.ravel()[2 * n:]:
        ax.axis("off")
    fig.suptitle("stain normalization: before (top) / after (bottom)")
    fig.tight_layout()
    return fig


def plot_comparison(images: Sequence[np.ndarray], normalized: Sequence[np.ndarray], target: np.ndarray,
                    titles: Sequence[str] | None = None):
    """Figure: target, then each source above its normalized version."""
    import matplotlib.pyplot as plt

    n = len(images)
    fig, axes = plt.subplots(2, n + 1, figsize=(2.6 * (n + 1), 5.4), squeeze=False)
    axes[0, 0].imshow(target)
    axes[0, 0].set_title("target", fontsize=8)
    axes[1, 0].axis("off")
    for j in range(n):
        axes[0, j + 1].imshow(images[j])
        axes[1, j + 1].imshow(normalized[j])
        axes[0, j + 1].set_title(titles[j] if titles else f"#{j}", fontsize=8)
        axes[1, j + 1].set_title(f"dE {lab_distance(images[j], target):.1f} -> {lab_distance(normalized[j], target):.1f}",
                                 fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig
