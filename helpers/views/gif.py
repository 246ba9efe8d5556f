"""Figures of step 06 (training GIF): the first and last epoch frames."""

from __future__ import annotations

from pathlib import Path

from helpers.gif import list_frames


def plot_frames(frames_dir: str | Path, which: str = "first_last"):
    """Figure: the first and last epoch frames side by side (``which="first_last"``) or the last only."""
    import imageio.v3 as iio
    import matplotlib.pyplot as plt

    frames = list_frames(frames_dir)
    chosen = [frames[-1]] if which == "last" or len(frames) == 1 else [frames[0], frames[-1]]
    images = [iio.imread(p)[..., :3] for p in chosen]
    h, w = images[0].shape[:2]
    fig, axes = plt.subplots(1, len(images), figsize=(w / 100 * len(images), h / 100), squeeze=False)
    for ax, img, p in zip(axes[0], images, chosen):
        ax.imshow(img)
        ax.set_title(p.stem.replace("_", " "), fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return fig
