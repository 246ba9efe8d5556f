"""Figures and the strength widget of step 04 (augmentation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from helpers.augment import A, default_augmentation  # helpers.augment imports albumentations without its update check


def plot_preview(aug: A.BaseCompose, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], class_map,
                 n_aug: int = 3, seed: int | None = 0, alpha: float = 0.4):
    """Figure: each tile (first column) and ``n_aug`` augmented versions, label overlay below each.

    Unlabelled pixels (0) show no colour; padding invented by a transform is white with no label.
    """
    import matplotlib.pyplot as plt

    from helpers.viz import legend_handles, overlay

    if seed is not None:
        aug.set_random_seed(seed)
    n = len(images)
    cols = n_aug + 1
    fig, axes = plt.subplots(2 * n, cols, figsize=(2.3 * cols, 2.3 * 2 * n), squeeze=False)
    for i, (img, mask) in enumerate(zip(images, masks)):
        pairs = [(img, mask)] + [(o["image"], o["mask"]) for o in (aug(image=img, mask=mask) for _ in range(n_aug))]
        for j, (im, m) in enumerate(pairs):
            axes[2 * i, j].imshow(im)
            axes[2 * i + 1, j].imshow(overlay(im, m, class_map, alpha))
            if i == 0:
                axes[0, j].set_title("original" if j == 0 else f"augmented #{j}", fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    axes[-1, 0].figure.legend(handles=legend_handles(class_map), loc="lower center", ncol=len(class_map.classes),
                              fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def augmentation_widget(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], class_map, **strengths: float):
    """ipywidgets control: sliders for the strengths and a re-roll button, redrawing the preview.

    For people only: call it when :func:`helpers.nb.interactive` is True. The chosen
    values are printed so they can be copied into the ``parameters`` cell.
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from helpers.nb import show_figure

    ranges = {"flip": (0, 1, 0.05), "rotate90": (0, 1, 0.05), "scale": (0, 0.4, 0.01), "rotate": (0, 45, 1),
              "elastic": (0, 60, 1), "blur": (0, 3, 0.1), "noise": (0, 0.2, 0.005), "brightness": (0, 0.4, 0.01),
              "contrast": (0, 0.4, 0.01), "hed_sigma": (0, 0.3, 0.01), "hed_bias": (0, 0.1, 0.005)}
    import inspect

    params = inspect.signature(default_augmentation).parameters
    defaults = {**{k: params[k].default for k in ranges}, **strengths}
    sliders = {k: widgets.FloatSlider(value=float(defaults[k]), min=lo, max=hi, step=st, description=k,
                                      continuous_update=False) for k, (lo, hi, st) in ranges.items()}
    button = widgets.Button(description="re-roll")
    status = widgets.HTML("")
    out = widgets.Output()
    state = {"seed": 0}

    def redraw(*_: Any) -> None:
        controls = [*sliders.values(), button]
        status.value = "<i>drawing…</i>"
        for c in controls:
            c.disabled = True
        try:
            vals = {k: s.value for k, s in sliders.items()}
            fig = plot_preview(default_augmentation(**vals), images, masks, class_map, seed=state["seed"])
            show_figure(out, fig, "parameters: " + ", ".join(f"{k}={v:g}" for k, v in vals.items()))  # issue 18
            plt.close(fig)
        finally:
            for c in controls:
                c.disabled = False
            status.value = ""

    def reroll(*_: Any) -> None:
        state["seed"] += 1
        redraw()

    for s in sliders.values():
        s.observe(redraw, names="value")
    button.on_click(reroll)
    redraw()
    return widgets.VBox([widgets.HBox([widgets.VBox(list(sliders.values())[:6]), widgets.VBox(list(sliders.values())[6:])]),
                         widgets.HBox([button, status]),
                         widgets.Box([out], layout=widgets.Layout(max_height="640px", overflow="auto"))])
