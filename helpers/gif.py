"""The training GIF: one frame per epoch (image | label | prediction), then the animation.

:class:`FrameWriter` is called by :func:`helpers.train.train_model` after every epoch with
the validation predictions; it writes ``model/frames/epoch_NNN.png``.
:func:`assemble_gif` turns the frames into ``gif/training.gif`` (step 06); the figure of
first and last frames is in :mod:`helpers.views.gif`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from helpers.config import ClassMap
from helpers.errors import HistoUNetError, ParameterError
from helpers.metrics import headline_name

log = logging.getLogger(__name__)

FRAME_PATTERN = "epoch_*.png"
_HEADER = 34


def _text(img: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.6, color=(0, 0, 0)) -> None:
    import cv2

    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, color, 1, cv2.LINE_AA)


def render_frame(images: list[np.ndarray], labels: list[np.ndarray], preds: list[np.ndarray], class_map: ClassMap,
                 epoch: int, iou: float, headline: str | None = None, size: int = 192) -> np.ndarray:
    """One frame: a row per tile with image | label (unlabelled black) | prediction, and a header.

    Args:
        images, labels, preds: RGB tiles, their label images and predicted labels (1..N).
        epoch: Epoch number written on the frame.
        iou: Validation IoU of the ``headline`` class written on the frame.
        headline: Name of that class; None = the class map's headline class.
        size: Side of each panel in pixels.

    Returns:
        An RGB uint8 image (same size for every epoch, as a GIF needs).
    """
    import cv2

    if not images:
        raise ParameterError("no tiles to draw a frame; check gif_tiles and the validation split")
    lut = class_map.palette()
    headline = headline or headline_name(class_map) or "headline"
    rows = []
    for img, lab, pred in zip(images, labels, preds):
        panels = [img[..., :3], lut[lab], lut[pred]]
        panels = [cv2.resize(np.ascontiguousarray(p), (size, size),
                             interpolation=cv2.INTER_AREA if i == 0 else cv2.INTER_NEAREST)
                  for i, p in enumerate(panels)]
        sep = np.full((size, 4, 3), 255, np.uint8)
        rows.append(np.concatenate([panels[0], sep, panels[1], sep, panels[2]], axis=1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    body = np.concatenate(rows[:-1], axis=0)
    width = body.shape[1]
    header = np.full((_HEADER * 2, width, 3), 255, np.uint8)
    iou_txt = f"{iou:.3f}" if np.isfinite(iou) else "n/a"
    _text(header, f"epoch {epoch:3d}   {headline} IoU {iou_txt}", (6, 22), 0.65)
    for i, title in enumerate(("image", "label", "prediction")):
        _text(header, title, (i * (size + 4) + 6, _HEADER * 2 - 10), 0.5, (80, 80, 80))
    legend = np.full((22, width, 3), 255, np.uint8)
    x = 6
    for c in class_map.classes:
        legend[6:18, x:x + 12] = c.color
        _text(legend, c.name, (x + 16, 16), 0.4)
        x += 16 + 9 * len(c.name) + 10
    return np.concatenate([header, body, legend], axis=0)


class FrameWriter:
    """Writes ``epoch_NNN.png`` for a fixed set of validation tiles (chosen once, by seed)."""

    def __init__(self, frames_dir: str | Path, images: list[np.ndarray], labels: list[np.ndarray],
                 class_map: ClassMap, n_tiles: int = 4, headline: str | None = None, seed: int = 0,
                 boxes: list | None = None):
        self.dir = Path(frames_dir)
        self.cm = class_map
        self.headline = headline or headline_name(class_map)
        n = min(max(1, n_tiles), len(images))
        # greedy: the headline class first, then classes not shown yet; tiles must not overlap (boxes)
        try:
            target = class_map.label_of(self.headline) if self.headline else -1
        except HistoUNetError:
            target = -1
        frac = np.array([[np.mean(lab == c.label) for c in class_map.classes] for lab in labels])
        labelled = frac.sum(axis=1, keepdims=True)
        # share among the labelled pixels, damped for tiles with hardly any label
        frac = frac / np.maximum(labelled, 1e-9) * np.minimum(1.0, 5 * labelled)
        boost = np.array([2.0 if c.label == target else 1.0 for c in class_map.classes])
        jitter = np.random.default_rng(seed).random(len(labels)) * 1e-6
        shown = np.zeros(class_map.n_classes)
        chosen: list[int] = []

        def overlaps(i: int, j: int) -> bool:
            if boxes is None:
                return False
            (s1, x1, y1, w1, h1), (s2, x2, y2, w2, h2) = boxes[i], boxes[j]
            return s1 == s2 and x1 < x2 + w2 and x2 < x1 + w1 and y1 < y2 + h2 and y2 < y1 + h1

        for strict in (True, False):
            while len(chosen) < n:
                score = frac @ (boost / (1.0 + shown)) + jitter
                score[chosen] = -np.inf
                if strict:
                    for i in range(len(labels)):
                        if any(overlaps(i, j) for j in chosen):
                            score[i] = -np.inf
                i = int(np.argmax(score))
                if not np.isfinite(score[i]):
                    break
                chosen.append(i)
                shown += frac[i]
        self.index = sorted(chosen)
        self.images = [images[i] for i in self.index]
        self.labels = [labels[i] for i in self.index]

    def __call__(self, epoch: int, iou: float, val_preds: list[np.ndarray]) -> Path:
        from helpers.io import write_image

        preds = [val_preds[i] for i in self.index]
        frame = render_frame(self.images, self.labels, preds, self.cm, epoch, iou, self.headline)
        return write_image(frame, self.dir / f"epoch_{epoch:03d}.png", overwrite=True)


def list_frames(frames_dir: str | Path) -> list[Path]:
    """The frame files in epoch order; raises if there are none."""
    frames = sorted(Path(frames_dir).glob(FRAME_PATTERN))
    if not frames:
        raise HistoUNetError(f"{frames_dir}: no {FRAME_PATTERN} frames; run 05_train_model with frames on first")
    return frames


def assemble_gif(frames_dir: str | Path, out_path: str | Path, fps: float = 2.0, hold_last: int = 3,
                 every: int = 1, overwrite: bool = False) -> Path:
    """Assemble the epoch frames into an endlessly looping GIF.

    Args:
        frames_dir: Folder of ``epoch_NNN.png``.
        out_path: The GIF to write (atomically).
        fps: Frames per second.
        hold_last: Show the last frame this many frame-times longer, so the result stays on screen.
        every: Keep every n-th epoch (the last is always kept).
        overwrite: Replace an existing GIF.
    """
    import imageio.v3 as iio

    from helpers.io import atomic_path

    from helpers.steps import fingerprint_of, reuse_or_guard

    if fps <= 0:
        raise ParameterError(f"fps={fps}: must be > 0")
    frames = list_frames(frames_dir)
    fingerprint = fingerprint_of(dict(fps=fps, hold_last=hold_last, every=every, gif=Path(out_path).name), frames)
    if reuse_or_guard(Path(out_path).parent, fingerprint, overwrite, "training GIF", in_place=True, guard=False):
        return Path(out_path)
    keep = frames[::max(1, int(every))]
    if keep[-1] != frames[-1]:
        keep.append(frames[-1])
    images = [iio.imread(p)[..., :3] for p in keep]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise HistoUNetError(f"{frames_dir}: frames differ in size {sorted(shapes)}; delete the old frames and retrain")
    # one GIF frame per kept epoch (identical frames would be merged by the encoder anyway)
    durations = [1000.0 / fps] * len(images)
    durations[-1] *= 1 + max(0, int(hold_last))
    with atomic_path(out_path, overwrite) as tmp:
        iio.imwrite(tmp, np.stack(images), extension=".gif", duration=durations, loop=0)
    log.info("%s: %d frames at %.1f fps", out_path, len(images), fps)
    return Path(out_path)


def gif_frame_count(path: str | Path) -> int:
    """Number of frames in a GIF file."""
    import imageio.v3 as iio

    return int(iio.improps(path, index=None).shape[0])
