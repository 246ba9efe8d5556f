"""Training inputs (step 05): the tile table, tile reading, augmentation and the ``tf.data`` pipeline.

Reads the newest tile table of the work folder (:func:`helpers.steps.latest_tile_manifest`:
``labels/`` of 03, else ``stain/`` or ``tiles/`` with a warning).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pandas as pd

from helpers.config import ClassMap
from helpers.errors import HistoUNetError, ParameterError
from helpers.steps import latest_tile_manifest, step_dir

log = logging.getLogger(__name__)

#: Why training from an older tile table is worse, per step.
_FALLBACK_NOTES = {
    "stain": "labels are not refined (03 not run)",
    "tiles": "images are NOT stain-normalised and labels not refined (02, 03 not run)",
}


def find_tile_manifest(workdir: str | Path) -> tuple[Path, str]:
    """The manifest to train from: ``labels/`` (step 03), else ``stain/`` or ``tiles/`` with a warning.

    All three share the same columns (docs/workfolder.md); only 03's labels are refined
    and only 02's images are stain-normalised, so the fallbacks are announced loudly.

    Returns:
        ``(manifest path, step name)``.
    """
    path, step = latest_tile_manifest(workdir)
    if step in _FALLBACK_NOTES:
        log.warning("%s: training from %s/ because %s", path, step, _FALLBACK_NOTES[step])
    return path, step


def read_tiles(workdir: str | Path, class_map: ClassMap) -> tuple[pd.DataFrame, str]:
    """Read and check the tile manifest; add absolute paths and labelled-pixel counts."""
    workdir = Path(workdir)
    path, step = find_tile_manifest(workdir)
    df = pd.read_csv(path)
    need = {"tile_id", "slide", "image", "label", "x", "y", "w", "h", "mpp"}
    missing = need - set(df.columns)
    if missing:
        raise HistoUNetError(f"{path}: columns {sorted(missing)} missing; re-run the step that wrote it")
    if df.empty:
        raise HistoUNetError(f"{path}: no tiles; export tiles with labels first")
    df = df.copy()
    df["image_path"] = [str(workdir / p) for p in df["image"]]
    df["label_path"] = [str(workdir / p) for p in df["label"]]
    for col in ("image_path", "label_path"):
        absent = [p for p in df[col] if not Path(p).is_file()]
        if absent:
            raise HistoUNetError(f"{path}: {len(absent)} file(s) missing, e.g. {absent[0]}; re-run step {step}")
    px_cols = [f"px_{n}" for n in class_map.names]
    if all(c in df.columns for c in px_cols):
        df["px_labelled"] = df[px_cols].sum(axis=1)
    else:
        log.warning("%s: no px_<class> columns; counting labels from the files", path)
        counts = np.stack([np.bincount(read_label_tile(p).ravel(), minlength=256)[: class_map.n_classes + 1]
                           for p in df["label_path"]])
        for i, name in enumerate(class_map.names):
            df[f"px_{name}"] = counts[:, i + 1]
        df["px_labelled"] = counts[:, 1:].sum(axis=1)
    return df, step


def read_image_tile(path: str) -> np.ndarray:
    """An RGB uint8 tile image."""
    import cv2

    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise HistoUNetError(f"{path}: cannot read image; re-export the tile")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_label_tile(path: str) -> np.ndarray:
    """A uint8 label tile (first channel if it has several)."""
    import cv2

    lab = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if lab is None:
        raise HistoUNetError(f"{path}: cannot read label tile; re-run 03")
    if lab.ndim == 3:
        lab = lab[..., 0]
    return lab.astype(np.uint8)



def load_augmentation(workdir: str | Path, enabled: bool = True):
    """The saved albumentations pipeline of step 04, or None (with a WARNING) if unavailable."""
    if not enabled:
        return None
    path = step_dir(workdir, "augment") / "augment.yaml"
    try:
        from helpers.augment import load_augmentation as _load
    except ImportError:
        log.warning("helpers.augment not available: training with flips/rotations only")
        return None
    if not path.is_file():
        log.warning("%s not found (run 04_augment_tiles): training with flips/rotations only", path)
        return None
    return _load(path)


def fit_multiple(arr: np.ndarray, multiple: int = 32) -> np.ndarray:
    """Pad (reflect) or centre-crop to sides that are multiples of ``multiple``."""
    h, w = arr.shape[:2]
    h2, w2 = max(multiple, h - h % multiple), max(multiple, w - w % multiple)
    if (h2, w2) == (h, w):
        return arr
    if h < h2 or w < w2:
        pad = [(0, max(0, h2 - h)), (0, max(0, w2 - w))] + [(0, 0)] * (arr.ndim - 2)
        arr = np.pad(arr, pad, mode="reflect" if arr.ndim == 3 else "constant")
    y0, x0 = (arr.shape[0] - h2) // 2, (arr.shape[1] - w2) // 2
    return arr[y0:y0 + h2, x0:x0 + w2]


def make_sample_fn(augmentation=None, crop_size: int | None = None, flips: bool = True):
    """Return ``fn(image_path, label_path, seed) -> (image uint8, label uint8)`` (numpy, thread-safe)."""

    def fn(image_path, label_path, seed):
        rng = np.random.default_rng(int(seed))
        img = read_image_tile(image_path.decode() if isinstance(image_path, bytes) else str(image_path))
        lab = read_label_tile(label_path.decode() if isinstance(label_path, bytes) else str(label_path))
        if lab.shape != img.shape[:2]:
            import cv2

            lab = cv2.resize(lab, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
        if crop_size and crop_size < min(img.shape[:2]):
            y0 = int(rng.integers(0, img.shape[0] - crop_size + 1))
            x0 = int(rng.integers(0, img.shape[1] - crop_size + 1))
            img, lab = img[y0:y0 + crop_size, x0:x0 + crop_size], lab[y0:y0 + crop_size, x0:x0 + crop_size]
        if augmentation is not None:
            random.seed(int(seed))
            out = augmentation(image=np.ascontiguousarray(img), mask=np.ascontiguousarray(lab))
            img, lab = out["image"], out["mask"]
        elif flips:
            k = int(rng.integers(0, 4))
            img, lab = np.rot90(img, k), np.rot90(lab, k)
            if rng.random() < 0.5:
                img, lab = img[:, ::-1], lab[:, ::-1]
        img, lab = fit_multiple(np.ascontiguousarray(img)), fit_multiple(np.ascontiguousarray(lab))
        return img.astype(np.uint8), lab.astype(np.uint8)

    return fn


def make_dataset(image_paths: list[str], label_paths: list[str], batch_size: int, training: bool,
                 augmentation=None, crop_size: int | None = None, seed: int = 0, parallel: int | None = None,
                 image_in_target: bool = False, pair=None):
    """A ``tf.data`` pipeline of ``(preprocess(image), label)`` batches from tile files.

    Training: infinite, shuffled, augmented (albumentations in ``tf.numpy_function``, in
    parallel), random crops of ``crop_size``. Validation: one ordered pass, no augmentation.
    ``image_in_target``: the target is ``(B, H, W, 4)`` float32, the label then the (augmented)
    image as RGB in 0..1, for the loss's local CRF term (:func:`helpers.losses.local_crf_loss`).
    ``pair`` (training): a ``(x, y) -> (x, y)`` map applied to each batch before preprocessing,
    e.g. :func:`helpers.consistency.pair_views` (B tiles become 2B, the tiles then their strong
    views) for the loss's consistency term.
    """
    import tensorflow as tf

    from helpers.model import preprocess

    if not image_paths:
        raise ParameterError("no tiles for the input pipeline; check the split")
    fn = make_sample_fn(augmentation if training else None, crop_size if training else None, flips=training)
    n = len(image_paths)
    ds = tf.data.Dataset.from_tensor_slices((list(map(str, image_paths)), list(map(str, label_paths))))
    if training:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True).repeat()
        ds = ds.enumerate().map(lambda i, t: (t[0], t[1], tf.cast(i, tf.int64) + seed * 1_000_003))
    else:
        ds = ds.map(lambda a, b: (a, b, tf.constant(0, tf.int64)))

    def load(ip, lp, s):
        img, lab = tf.numpy_function(fn, [ip, lp, s], [tf.uint8, tf.uint8])
        img.set_shape([None, None, 3])
        lab.set_shape([None, None])
        return img, lab

    ds = ds.map(load, num_parallel_calls=parallel or tf.data.AUTOTUNE, deterministic=not training)
    ds = ds.batch(batch_size, drop_remainder=False)
    if image_in_target:
        ds = ds.map(lambda x, y: (x, tf.concat([tf.cast(y, tf.float32)[..., None], tf.cast(x, tf.float32) / 255.0], -1)),
                    num_parallel_calls=tf.data.AUTOTUNE)
    if pair is not None:
        ds = ds.map(pair, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(lambda x, y: (preprocess(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)

