"""Figures of step 08 (evaluate): per-class scores, confusion, error overlay, variants."""

from __future__ import annotations

import numpy as np
import pandas as pd

from helpers.config import ClassMap
from helpers.evaluate import SlideEvaluation, error_map
from helpers.metrics import headline_name
from helpers.variants import cheapest_within, repeat_pick, summarize_repeats, variant_label


def plot_metrics(metrics: pd.DataFrame, title: str = ""):
    """Figure: per-class IoU and Dice bars, one group per reference kind (overall rows if any)."""
    import matplotlib.pyplot as plt

    df = metrics
    if "slide" in df.columns and (df["slide"] == "overall").any():
        df = df[df["slide"] == "overall"]
    if "reference" not in df.columns:
        df = df.assign(reference="reference")
    kinds = list(dict.fromkeys(df["reference"]))
    classes = list(dict.fromkeys(df["class"]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    width = 0.8 / max(1, len(kinds))
    x = np.arange(len(classes))
    for ax, metric in zip(axes, ("iou", "dice")):
        for i, kind in enumerate(kinds):
            vals = df[df["reference"] == kind].set_index("class").reindex(classes)[metric].to_numpy(float)
            bars = ax.bar(x + (i - (len(kinds) - 1) / 2) * width, np.nan_to_num(vals), width, label=kind)
            for b, v in zip(bars, vals):
                ax.annotate("n/a" if np.isnan(v) else f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, classes)
        ax.set_ylim(0, 1.08)
        ax.set_title("IoU" if metric == "iou" else "Dice")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("score (reference-labelled pixels)")
    if len(kinds) > 1:
        axes[1].legend(title="reference", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_confusion(confusion: np.ndarray, class_map: ClassMap, title: str = "", normalize: bool = True):
    """Figure: confusion matrix (rows = reference, columns = prediction), row-normalized."""
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion, float)[1:, :]
    cols = ["none"] + class_map.names
    if not cm[:, 0].any():  # no "nothing predicted" pixels: drop the column
        cm, cols = cm[:, 1:], cols[1:]
    shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalize else cm
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 2.2, 1.0 * len(class_map.names) + 1.6))
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    for i in range(shown.shape[0]):
        for j in range(shown.shape[1]):
            txt = f"{shown[i, j]:.2f}\n({int(cm[i, j]):,})" if normalize else f"{int(cm[i, j]):,}"
            ax.text(j, i, txt, ha="center", va="center", fontsize=7,
                    color="white" if shown[i, j] > 0.6 * (shown.max() or 1) else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(class_map.names)), class_map.names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title(title or ("confusion (share of each reference row; pixel counts)" if normalize else "confusion (pixels)"))
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def plot_errors(result: SlideEvaluation, class_map: ClassMap, image: np.ndarray | None = None,
                title: str = "", max_size: int = 1200):
    """Figure: reference, prediction and the misclassified regions overlaid on the slide.

    Misclassified pixels are red, correct ones green; pixels the reference does not
    label stay uncoloured.

    Args:
        result: From :func:`evaluate_labels`.
        class_map: The classes (colours).
        image: Optional RGB thumbnail of the slide (resized to the label image).
        title: Figure title.
        max_size: Longest side shown (label images are subsampled for the picture).
    """
    import cv2
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from helpers.viz import colorize, legend_handles

    ref, pred = result.reference, result.prediction
    step = max(1, int(np.ceil(max(ref.shape) / max_size)))
    ref, pred = ref[::step, ::step], pred[::step, ::step]
    err = error_map(ref, pred)
    if image is None:
        base = np.full(ref.shape + (3,), 255, np.uint8)
    else:
        base = cv2.resize(np.ascontiguousarray(image[..., :3]), (ref.shape[1], ref.shape[0]), interpolation=cv2.INTER_AREA)
    over = base.astype(np.float32)
    for val, rgb, alpha in ((1, (0, 170, 0), 0.35), (2, (230, 0, 0), 0.6)):  # errors stand out, tissue shows through
        m = err == val
        over[m] = (1 - alpha) * over[m] + alpha * np.array(rgb, np.float32)
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4))
    panels = [(colorize(ref, class_map), f"reference ({result.reference_kind})"),
              (colorize(pred, class_map), "prediction"),
              (over.round().astype(np.uint8), "errors: red wrong, green right")]
    for ax, (img, t) in zip(axes, panels):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(t)
        ax.axis("off")
    axes[1].legend(handles=legend_handles(class_map), loc="lower right", fontsize=7, framealpha=0.8)
    axes[2].legend(handles=[Patch(color=(0.9, 0, 0), label="misclassified"), Patch(color=(0, 0.67, 0), label="correct")],
                   loc="lower right", fontsize=7, framealpha=0.8)
    s = result.summary
    head = headline_name(class_map) or "headline"
    fig.suptitle(title or f"{result.slide}: {head} IoU {s['tumor_iou']:.3f}, mean IoU {s['mean_iou']:.3f} "
                          f"(vs {result.reference_kind}, downsample {result.downsample:g})")
    fig.tight_layout()
    return fig


def plot_variants(table: pd.DataFrame, metric: str = "tumor_iou", tolerance: float = 0.005):
    """Figure: IoU against seconds for every setting (colour = overlap, marker = blend, size = kernel)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = {1: "tab:blue", 4: "tab:orange", 16: "tab:red"}
    markers = {"mean": "s", "gaussian": "o"}
    kernels = list(dict.fromkeys(table["kernel"]))
    multi = table["model"].nunique() > 1
    if multi:  # several models: the setting chosen on the mean over the models (08's summary), at its mean
        summary = summarize_repeats(table, metric, tolerance)
        pick = repeat_pick(summary)
        px, py, best = pick["seconds"], pick["mean"], summary["mean"].max()
        chosen = f"chosen (mean of {int(pick['n_models'])} models): {variant_label(pick)}"
    else:
        pick = cheapest_within(table, metric, tolerance)
        px, py, best = pick["seconds"], pick[metric], table[metric].max()
        chosen = f"chosen: {variant_label(pick)}"
    for ax, m in zip(axes, (metric, "seam_score")):
        for _, r in table.iterrows():
            ax.scatter(r["seconds"], r[m], color=colors.get(int(r["overlap"]), "tab:gray"),
                       marker=markers.get(r["blend"], "^"), s=30 + 25 * kernels.index(r["kernel"]),
                       alpha=0.8, edgecolor="black", linewidth=0.5)
        ax.set_xlabel("seconds (prediction + smoothing)")
        ax.grid(alpha=0.3)
    axes[0].scatter(px, py, s=260, facecolor="none", edgecolor="green", linewidth=2)
    axes[0].annotate(chosen, (px, py), xytext=(-8, -16), ha="right", textcoords="offset points", fontsize=8,
                     color="green")
    axes[0].axhspan(best - tolerance, best, color="green", alpha=0.08, label=f"within {tolerance * 100:.1f} points of best")
    axes[0].set_ylabel(metric.replace("_", " ").replace("iou", "IoU"))
    axes[0].set_title("quality vs cost")
    axes[1].axhline(1.0, color="gray", linestyle="--", linewidth=1)
    if "seam_score_truth" in table:
        axes[1].scatter(table["seconds"], table["seam_score_truth"], marker="x", color="black", s=25, zorder=3)
    axes[1].set_ylabel("seam score (label changes on tile borders / elsewhere)")
    axes[1].set_title("tile seams (1 = invisible)")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker="o", linestyle="", label=f"overlap {o}") for o, c in colors.items()
               if o in set(table["overlap"])]
    handles += [Line2D([], [], color="gray", marker=mk, linestyle="", label=f"blend {b}") for b, mk in markers.items()
                if b in set(table["blend"])]
    handles += [Line2D([], [], color="gray", marker="o", linestyle="", markersize=np.sqrt(30 + 25 * i),
                       label=f"kernel {k}") for i, k in enumerate(kernels)]
    if "seam_score_truth" in table:
        handles.append(Line2D([], [], color="black", marker="x", linestyle="", label="truth on the same grid"))
    axes[1].legend(handles=handles, fontsize=7, loc="best")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
