"""Figures and the suggestion browser of step 09 (annotate next)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from helpers.config import ClassMap
from helpers.steps import step_dir


def _slide_file(workdir: Path, slide: str) -> Path:
    from helpers.predict import read_prediction_info

    info = read_prediction_info(step_dir(workdir, "predictions") / slide)
    p = Path(info.get("slide_path", ""))
    return p if p.is_file() else next(step_dir(workdir, "slides").glob(f"{slide}.*"))


def field_images(workdir: str | Path, row: pd.Series, size: int = 256, margin: float = 0.25) -> tuple[np.ndarray, np.ndarray, tuple]:
    """The slide around one field and its predicted labels (argmax), ``size`` px for the field.

    Returns:
        ``(rgb, labels, (x0, y0, downsample))`` with the field's frame at ``x0, y0`` in level-0 px.
    """
    from helpers.predict import probabilities_path
    from helpers.rasters import read_raster
    from helpers.slides import open_slide

    workdir = Path(workdir)
    ds = float(row["w"]) / size
    pad = float(row["w"]) * margin
    x0, y0 = float(row["x"]) - pad, float(row["y"]) - pad
    side = int(round(size * (1 + 2 * margin)))
    with open_slide(_slide_file(workdir, row["slide"])) as slide:
        rgb = slide.read(int(x0), int(y0), side, side, ds)
    probs = np.asarray(read_raster(probabilities_path(step_dir(workdir, "predictions") / row["slide"]), downsample=ds,
                                   region=(x0, y0, side * ds, side * ds)))
    labels = (probs.argmax(axis=-1) + 1).astype(np.uint8) if probs.ndim == 3 else np.zeros(rgb.shape[:2], np.uint8)
    labels[probs.max(axis=-1) == 0] = 0  # outside the prediction
    return rgb, labels, (x0, y0, ds)


def _draw_field(ax: Any, row: pd.Series, frame: tuple) -> None:
    from matplotlib.patches import Rectangle

    x0, y0, ds = frame
    ax.add_patch(Rectangle(((row["x"] - x0) / ds, (row["y"] - y0) / ds), row["w"] / ds, row["h"] / ds,
                           fill=False, edgecolor=(0, 0.63, 1.0), lw=2))


def gallery_figure(workdir: str | Path, table: pd.DataFrame, class_map: ClassMap, n: int = 12, ncols: int = 4,
                   alpha: float = 0.35):
    """The top ``n`` suggestions: slide with the prediction overlay, the field framed, score in the title."""
    import matplotlib.pyplot as plt

    from helpers.viz import legend_handles, overlay

    rows = table.sort_values("rank").head(n)
    nrows = max(1, int(np.ceil(len(rows) / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.4 * nrows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (_, r) in zip(axes.ravel(), rows.iterrows()):
        rgb, labels, frame = field_images(workdir, r)
        ax.imshow(overlay(rgb, labels, class_map, alpha))
        _draw_field(ax, r, frame)
        ax.set_title(f"{r['name']}: {r['slide']}\nuncertainty {r['uncertainty']:.2f}, score {r['score']:.2f}", fontsize=8)
    fig.legend(handles=legend_handles(class_map), loc="lower center", ncol=class_map.n_classes, fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def overview_figure(workdir: str | Path, fields: pd.DataFrame, table: pd.DataFrame, slide: str, max_size: int = 1024):
    """One slide: thumbnail with the suggested fields (left), the field uncertainty map (right)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from helpers.slides import open_slide

    with open_slide(_slide_file(Path(workdir), slide)) as s:
        thumb, ds = s.thumbnail(max_size)
    f = fields[fields["slide"] == slide]
    side = float(f["w"].iloc[0])
    nx, ny = int(f["x"].max() // side) + 1, int(f["y"].max() // side) + 1
    grid = np.full((ny, nx), np.nan)
    for _, r in f.iterrows():
        if r["tissue_fraction"] > 0:
            grid[int(r["y"] // side), int(r["x"] // side)] = r["uncertainty"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 6))
    axes[0].imshow(thumb)
    for _, r in table[table["slide"] == slide].iterrows():
        axes[0].add_patch(Rectangle((r["x"] / ds, r["y"] / ds), r["w"] / ds, r["h"] / ds, fill=False,
                                    edgecolor=(0, 0.63, 1.0), lw=1.5))
        axes[0].text(r["x"] / ds, r["y"] / ds - 3, str(r["rank"]), color=(0, 0.4, 0.8), fontsize=8)
    axes[0].set_title(f"{slide}: fields to annotate next (rank)")
    im = axes[1].imshow(grid, cmap="magma", vmin=0, vmax=max(0.05, float(np.nanmax(grid)) if np.isfinite(grid).any() else 1),
                        extent=(0, nx * side / ds, ny * side / ds, 0))
    annotated = f[(f["annotated_fraction"] > 0) & ~f["candidate"]] if "candidate" in f.columns else f.iloc[:0]
    for _, r in annotated.iterrows():
        axes[1].add_patch(Rectangle((r["x"] / ds, r["y"] / ds), r["w"] / ds, r["h"] / ds, fill=False, hatch="//",
                                    edgecolor="white", lw=0))
    axes[1].set_xlim(0, thumb.shape[1])
    axes[1].set_ylim(thumb.shape[0], 0)
    axes[1].set_title("mean uncertainty per field (hatched: already annotated)")
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig


def suggestion_browser(workdir: str | Path, table: pd.DataFrame, class_map: ClassMap):
    """ipywidgets browser: rank slider, overlay opacity, the field and its measurements.

    Building it needs no display; show it only when ``helpers.nb.interactive()``.
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from helpers.nb import show_figure
    from helpers.viz import overlay

    rows = table.sort_values("rank").reset_index(drop=True)
    rank = widgets.IntSlider(1, 1, max(1, len(rows)), description="rank")
    alpha = widgets.FloatSlider(value=0.35, min=0, max=1, step=0.05, description="opacity")
    out = widgets.Output()

    def draw(*_: Any) -> None:
        r = rows.iloc[rank.value - 1]
        rgb, labels, frame = field_images(workdir, r, size=384)
        fig, ax = plt.subplots(figsize=(6, 6))
        ax.imshow(overlay(rgb, labels, class_map, alpha.value))
        _draw_field(ax, r, frame)
        ax.set_title(f"{r['name']} on {r['slide']}", fontsize=9)
        ax.axis("off")
        fracs = ", ".join(f"{c[5:]} {r[c]:.0%}" for c in rows.columns if c.startswith("frac_"))
        text = (f"x {r['x_um']:.0f} um, y {r['y_um']:.0f} um, {r['w_um']:.0f} x {r['h_um']:.0f} um; "
                f"uncertainty {r['uncertainty']:.3f}, score {r['score']:.3f}; predicted: {fracs}")
        show_figure(out, fig, text)  # not `with out:` (it can hang nbclient, issue 18)
        plt.close(fig)

    rank.observe(draw, names="value")
    alpha.observe(draw, names="value")
    box = widgets.VBox([widgets.HBox([rank, alpha]), out])
    box.redraw = draw  # type: ignore[attr-defined]
    return box
