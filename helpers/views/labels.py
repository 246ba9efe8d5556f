"""Figures and the tile viewer of step 03 (label refinement)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from helpers.config import ClassMap
from helpers.errors import ClassMapError
from helpers.labels import truth_tile
from helpers.steps import step_dir
from helpers.tiles import read_label_tile


def plot_label_stats(stats: pd.DataFrame, class_map: ClassMap):
    """Figure: pixels and tiles per class before/after refinement (bars in class colours)."""
    import matplotlib.pyplot as plt

    colors = [(0.2, 0.2, 0.2)] + [np.array(c.color) / 255 for c in class_map.classes]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    x = np.arange(len(stats))
    for ax, what, unit in [(axes[0], "pixels", "pixels (millions)"), (axes[1], "tiles", "tiles containing the class")]:
        scale = 1e6 if what == "pixels" else 1
        ax.bar(x - 0.2, stats[f"{what}_before"] / scale, 0.4, color=colors, alpha=0.45, edgecolor="black", label="before")
        ax.bar(x + 0.2, stats[f"{what}_after"] / scale, 0.4, color=colors, edgecolor="black", hatch="//", label="after")
        ax.set_xticks(x, stats["class"], rotation=0)
        ax.set_ylabel(unit)
        ax.set_title(f"{what} per class: before (pale) vs after (hatched)")
    fig.tight_layout()
    return fig


def plot_before_after(workdir: str | Path, manifest: pd.DataFrame, class_map: ClassMap, n: int = 4, seed: int = 0,
                      truth: bool = True):
    """Figure: for ``n`` tiles, the image, raw labels, refined labels (and the dense truth if the demo has it)."""
    import matplotlib.pyplot as plt

    from helpers.io import read_image
    from helpers.viz import legend_handles, overlay

    workdir = Path(workdir)
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(manifest), size=min(n, len(manifest)), replace=False))
    image_col = "image_raw" if "image_raw" in manifest.columns else "image"
    show_truth = truth and (step_dir(workdir, "truth")).is_dir()
    ncols = 4 if show_truth else 3
    fig, axes = plt.subplots(len(pick), ncols, figsize=(3 * ncols, 3 * len(pick)), squeeze=False)
    for row, i in zip(axes, pick):
        r = manifest.iloc[i]
        img = read_image(workdir / r[image_col])
        panels = [(img, f"{r['slide']} x={r['x']} y={r['y']}"),
                  (overlay(img, read_label_tile(workdir / r["label_raw"]), class_map, 0.5), "annotations (before)"),
                  (overlay(img, read_label_tile(workdir / r["label"]), class_map, 0.5), "refined (after)")]
        if show_truth:
            t = truth_tile(workdir, r, img.shape[:2])
            panels.append((overlay(img, t, class_map, 0.5) if t is not None else img, "dense truth" if t is not None else "no truth"))
        for ax, (pic, title) in zip(row, panels):
            ax.imshow(pic)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.legend(handles=legend_handles(class_map), loc="lower center", ncol=class_map.n_classes, fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def label_viewer(workdir: str | Path, manifest: pd.DataFrame, class_map: ClassMap):
    """ipywidgets viewer: tile slider, before/after/truth, class toggles, overlay opacity.

    Building it needs no display; show it only when ``helpers.nb.interactive()``.
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from helpers.io import read_image
    from helpers.viz import overlay

    workdir = Path(workdir)
    image_col = "image_raw" if "image_raw" in manifest.columns else "image"
    views = ["after", "before"] if "label_raw" in manifest.columns else ["labels"]
    if (step_dir(workdir, "truth")).is_dir():
        views.append("truth")
    px_cols = {c.name: f"px_{c.name}" for c in class_map.classes if f"px_{c.name}" in manifest.columns}
    # start on the tile with the most labelled tissue (not tile 0, nor a tile of labelled glass)
    try:
        glass = {class_map.background.name}
    except ClassMapError:  # a class map without a background role: every class counts
        glass = set()
    tissue = [col for name, col in px_cols.items() if name not in glass] or list(px_cols.values())
    labelled = manifest[tissue].sum(axis=1) if tissue else pd.Series(0, index=manifest.index)
    start = int(np.argmax(labelled.to_numpy())) if len(manifest) else 0
    tile = widgets.IntSlider(start, 0, max(0, len(manifest) - 1), description="tile")
    jump = widgets.Dropdown(options=["(choose)"] + [f"tiles with most {n}" for n in px_cols], description="jump to")
    nxt = widgets.Button(description="next of these", tooltip="the next tile in this ranking")
    ranking: dict[str, list[int]] = {"order": []}
    swatch = "display:inline-block;width:12px;height:12px;margin:0 4px 0 10px;border:1px solid #333;background:rgb{}"
    legend = widgets.HTML("<b>legend</b>" + "".join(f'<span style="{swatch.format(tuple(c.color))}"></span>{c.name}'
                                                    for c in class_map.classes) + " &nbsp;·&nbsp; unlabelled pixels: no colour")
    view = widgets.ToggleButtons(options=views, description="labels")
    alpha = widgets.FloatSlider(value=0.45, min=0, max=1, step=0.05, description="opacity")
    toggles = {c.label: widgets.Checkbox(value=True, description=c.name, indent=False) for c in class_map.classes}
    out = widgets.Output()
    from helpers.nb import show_figure

    def draw(*_):
        r = manifest.iloc[tile.value]
        img = read_image(workdir / r[image_col])
        if view.value == "truth":
            lab = truth_tile(workdir, r, img.shape[:2])
            lab = np.zeros(img.shape[:2], np.uint8) if lab is None else lab
        else:
            lab = read_label_tile(workdir / r["label_raw" if view.value == "before" else "label"])
        hidden = [k for k, w in toggles.items() if not w.value]
        fig, ax = plt.subplots(figsize=(6, 6))
        ax.imshow(overlay(img, lab, class_map, alpha.value, hidden=hidden))
        ax.set_title(f"tile {tile.value}: {r['slide']} x={r['x']} y={r['y']}", fontsize=9)
        ax.axis("off")
        show_figure(out, fig)  # not `with out:` (it can hang nbclient, issue 18)
        plt.close(fig)

    def ranked(change) -> None:
        name = str(change["new"]).removeprefix("tiles with most ")
        if name not in px_cols:
            return
        ranking["order"] = list(np.argsort(-manifest[px_cols[name]].to_numpy(), kind="stable"))
        tile.value = int(ranking["order"][0])

    def next_tile(*_) -> None:
        order = ranking["order"]
        if order:
            i = order.index(tile.value) if tile.value in order else -1
            tile.value = int(order[(i + 1) % len(order)])

    jump.observe(ranked, names="value")
    nxt.on_click(next_tile)
    for w in [tile, view, alpha, *toggles.values()]:
        w.observe(draw, names="value")
    box = widgets.VBox([widgets.HBox([tile, alpha]), widgets.HBox([jump, nxt]), view,
                        widgets.HBox(list(toggles.values())), legend, out])
    box.redraw = draw  # type: ignore[attr-defined]
    return box
