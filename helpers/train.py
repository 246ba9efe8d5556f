"""Train the U-Net from sparse labels: data split, input pipeline, masked loss, metrics, loop.

Reads ``workdir/labels/manifest.csv`` (step 03) and writes ``workdir/model/`` (see
``docs/workfolder.md``). Unlabelled pixels (label 0) count for nothing: not in the loss,
not in the metrics. Tumour IoU on the validation tiles (labelled pixels only) picks
``best.keras``. Train and validation tiles are split by slide, or by spatial blocks of a
slide, so overlapping or neighbouring tiles never sit on both sides.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from helpers.config import ClassMap, load_class_map, step_dir
from helpers.errors import HistoUNetError, OutputExistsError, ParameterError

log = logging.getLogger(__name__)

SPLIT_COLUMN = "split"


# --------------------------------------------------------------------------- inputs
def find_tile_manifest(workdir: str | Path) -> tuple[Path, str]:
    """The manifest to train from: ``labels/`` (step 03), else ``stain/`` or ``tiles/`` with a warning.

    All three share the same columns (docs/workfolder.md); only 03's labels are refined
    and only 02's images are stain-normalised, so the fallbacks are announced loudly.

    Returns:
        ``(manifest path, step name)``.
    """
    workdir = Path(workdir)
    for step, note in (("labels", ""), ("stain", "labels are not refined (03 not run)"),
                       ("tiles", "images are NOT stain-normalised and labels not refined (02, 03 not run)")):
        path = step_dir(workdir, step) / "manifest.csv"
        if path.is_file():
            if note:
                log.warning("%s: training from %s/ because %s", path, step, note)
            return path, step
    raise HistoUNetError(f"{workdir}/labels/manifest.csv: not found; run 01_export_tiles .. 03 first (or check workdir=)")


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
        counts = np.stack([np.bincount(_read_label(p).ravel(), minlength=256)[: class_map.n_classes + 1]
                           for p in df["label_path"]])
        for i, name in enumerate(class_map.names):
            df[f"px_{name}"] = counts[:, i + 1]
        df["px_labelled"] = counts[:, 1:].sum(axis=1)
    return df, step


def _read_image(path: str) -> np.ndarray:
    import cv2

    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise HistoUNetError(f"{path}: cannot read image; re-export the tile")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _read_label(path: str) -> np.ndarray:
    import cv2

    lab = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if lab is None:
        raise HistoUNetError(f"{path}: cannot read label tile; re-run 03")
    if lab.ndim == 3:
        lab = lab[..., 0]
    return lab.astype(np.uint8)


# --------------------------------------------------------------------------- split
def split_tiles(df: pd.DataFrame, val_fraction: float = 0.25, by: str = "auto", block_size: float | None = None,
                seed: int = 0, class_names: list[str] | None = None, trials: int = 200, margin: float = 0.0) -> pd.DataFrame:
    """Split tiles into ``train`` / ``val`` (column ``split``) by slide or by spatial region.

    ``by="slide"`` puts whole slides on one side. ``by="region"`` cuts each slide into
    square blocks of ``block_size`` level-0 pixels (default: 3 tile widths), assigns each
    tile to the block holding its centre, and draws validation blocks; any training tile
    that overlaps, touches or comes within ``margin`` level-0 pixels of a validation tile
    is then marked ``excluded``, so no pixel (and no direct neighbour) is on both sides
    even when tiles overlap. ``"auto"`` is by slide with three slides or more, else by
    region. Among ``trials`` random draws the one whose per-class labelled-pixel share in
    validation is closest to ``val_fraction`` (tumour present on both sides) and which
    excludes the fewest tiles is kept.

    Returns:
        A copy of ``df`` with ``split`` (train / val / excluded) and ``group`` columns.
    """
    if not 0 < val_fraction < 1:
        raise ParameterError(f"val_fraction={val_fraction}: must be between 0 and 1")
    if by not in ("auto", "slide", "region"):
        raise ParameterError(f"split_by={by!r}: use 'slide', 'region' or 'auto'")
    df = df.copy().reset_index(drop=True)
    n_slides = df["slide"].nunique()
    if by == "auto":
        by = "slide" if n_slides >= 3 else "region"
    if by == "slide":
        if n_slides < 2:
            raise ParameterError(f"split_by='slide' needs two slides or more; got {n_slides}; use split_by='region'")
        df["group"] = df["slide"].astype(str)
    else:
        if block_size is None:
            block_size = 3 * float(np.median(df["w"]))
        cx = (df["x"] + df["w"] / 2) // block_size
        cy = (df["y"] + df["h"] / 2) // block_size
        df["group"] = [f"{s}|{int(i)},{int(j)}" for s, i, j in zip(df["slide"], cx, cy)]
    groups = sorted(df["group"].unique())
    if len(groups) < 2:
        raise ParameterError(f"only one {by} group; lower block_size (now {block_size}) or add slides")
    px_cols = [f"px_{n}" for n in class_names] if class_names else []
    px_cols = [c for c in px_cols if c in df.columns]
    weights = df[px_cols].to_numpy(float) if px_cols else np.ones((len(df), 1))
    group_idx = np.searchsorted(groups, df["group"].to_numpy())
    per_group = np.zeros((len(groups), weights.shape[1]))
    np.add.at(per_group, group_idx, weights)
    total = per_group.sum(axis=0)
    present = total > 0
    touch = _touching(df, margin) if by == "region" and len(df) <= 6000 else None
    rng = np.random.default_rng(seed)
    best, best_score = None, np.inf
    for _ in range(max(1, trials)):
        order = rng.permutation(len(groups))
        chosen, acc = [], np.zeros_like(total)
        for g in order:
            if len(chosen) >= len(groups) - 1:
                break
            share = acc[present].sum() / max(total[present].sum(), 1)
            if chosen and share >= val_fraction:
                break
            chosen.append(g)
            acc = acc + per_group[g]
        val = np.isin(group_idx, chosen)
        lost = touch[:, val].any(axis=1) & ~val if touch is not None else np.zeros(len(df), bool)
        v, t = weights[val].sum(0)[present], weights[~val & ~lost].sum(0)[present]
        frac = v / np.maximum(v + t, 1)
        # a class missing on either side is the worst outcome; then closeness to the target; then lost pixels
        score = (np.abs(frac - val_fraction).sum() + 10 * np.sum((v == 0) | (t == 0))
                 + weights[lost].sum() / max(weights.sum(), 1))
        if score < best_score:
            best, best_score = list(chosen), score
    val_mask = np.isin(group_idx, best)
    df[SPLIT_COLUMN] = np.where(val_mask, "val", "train")
    if by == "region":
        near = (touch if touch is not None else _touching(df, margin))[:, val_mask].any(axis=1) & ~val_mask
        df.loc[near, SPLIT_COLUMN] = "excluded"
    return df


def _touching(df: pd.DataFrame, margin: float = 0.0) -> np.ndarray:
    """``(n, n)`` bool: tiles of the same slide that overlap, touch or lie within ``margin`` level-0 px."""
    x0, y0 = df["x"].to_numpy(float), df["y"].to_numpy(float)
    x1, y1 = x0 + df["w"].to_numpy(float), y0 + df["h"].to_numpy(float)
    slide = pd.factorize(df["slide"])[0]
    return ((x0[:, None] <= x1[None] + margin) & (x0[None] <= x1[:, None] + margin)
            & (y0[:, None] <= y1[None] + margin) & (y0[None] <= y1[:, None] + margin)
            & (slide[:, None] == slide[None]))


# --------------------------------------------------------------------------- loss and metrics
def class_weights_from_counts(counts: np.ndarray, power: float = 0.5, max_weight: float = 10.0) -> np.ndarray:
    """Class weights ``(median_freq / freq_c) ** power`` from labelled-pixel counts (absent classes: 1).

    Normalised so the mean over present classes is 1; clipped to ``max_weight``.
    """
    counts = np.asarray(counts, float)
    w = np.ones_like(counts)
    present = counts > 0
    if present.any():
        freq = counts[present] / counts[present].sum()
        w[present] = (np.median(freq) / freq) ** power
        w[present] /= w[present].mean()
    return np.clip(w, 1.0 / max_weight, max_weight).astype(np.float32)


def _register(cls):
    import keras

    return keras.saving.register_keras_serializable(package="histo_unet")(cls)


def make_loss(n_classes: int, ce_weight: float = 1.0, dice_weight: float = 1.0, focal_gamma: float = 0.0,
              class_weights: list[float] | None = None):
    """The sparse-label loss: (focal) cross-entropy + soft Dice over **labelled pixels only**.

    ``y_true`` holds label values (0 unlabelled, 1..N); ``y_pred`` the softmax (N channels).
    Pixels with label 0 are masked out of both terms, so any prediction there leaves the
    loss unchanged. ``class_weights`` weight both terms per class.

    Returns:
        A ``keras.losses.Loss`` (serialisable, so ``last.keras`` resumes with its optimizer).
    """
    return _loss_class()(n_classes=n_classes, ce_weight=ce_weight, dice_weight=dice_weight,
                         focal_gamma=focal_gamma, class_weights=class_weights)


_LOSS_CLS = None


def _loss_class():
    global _LOSS_CLS
    if _LOSS_CLS is not None:
        return _LOSS_CLS
    import keras
    import tensorflow as tf

    @_register
    class SparseLabelLoss(keras.losses.Loss):
        def __init__(self, n_classes: int, ce_weight: float = 1.0, dice_weight: float = 1.0,
                     focal_gamma: float = 0.0, class_weights: list[float] | None = None,
                     name: str = "sparse_label_loss", **kwargs):
            kwargs.pop("reduction", None)
            super().__init__(name=name, reduction="sum_over_batch_size", **kwargs)
            self.n_classes = int(n_classes)
            self.ce_weight = float(ce_weight)
            self.dice_weight = float(dice_weight)
            self.focal_gamma = float(focal_gamma)
            self.class_weights = None if class_weights is None else [float(v) for v in class_weights]

        def call(self, y_true, y_pred):
            y_pred = tf.clip_by_value(tf.cast(y_pred, tf.float32), 1e-7, 1.0 - 1e-7)
            labels = tf.cast(y_true, tf.int32)
            if labels.shape.rank == y_pred.shape.rank:
                labels = labels[..., 0]
            mask = tf.cast(labels > 0, tf.float32)[..., None]
            onehot = tf.one_hot(labels - 1, self.n_classes, dtype=tf.float32) * mask  # label 0 -> all zeros
            cw = tf.constant(self.class_weights if self.class_weights else [1.0] * self.n_classes, tf.float32)
            total = tf.constant(0.0)
            if self.ce_weight:
                pt = tf.reduce_sum(onehot * y_pred, axis=-1)
                w_px = tf.reduce_sum(onehot * cw, axis=-1)
                ce = -tf.math.log(tf.clip_by_value(pt, 1e-7, 1.0))
                if self.focal_gamma:
                    ce = ce * tf.pow(1.0 - pt, self.focal_gamma)
                ce = tf.reduce_sum(w_px * ce) / tf.maximum(tf.reduce_sum(w_px), 1e-6)
                total = total + self.ce_weight * ce
            if self.dice_weight:
                axes = [0, 1, 2]
                inter = tf.reduce_sum(onehot * y_pred, axis=axes)
                denom = tf.reduce_sum(mask * y_pred, axis=axes) + tf.reduce_sum(onehot, axis=axes)
                dice = (2.0 * inter + 1.0) / (denom + 1.0)
                dice_loss = tf.reduce_sum(cw * (1.0 - dice)) / tf.reduce_sum(cw)
                total = total + self.dice_weight * dice_loss
            return total

        def get_config(self):
            return {"name": self.name, "n_classes": self.n_classes, "ce_weight": self.ce_weight,
                    "dice_weight": self.dice_weight, "focal_gamma": self.focal_gamma,
                    "class_weights": self.class_weights}

    _LOSS_CLS = SparseLabelLoss
    return _LOSS_CLS


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``(N, N)`` confusion counts over labelled pixels; rows truth label 1..N, columns predicted.

    Args:
        truth: Label values (0 unlabelled, 1..N), any shape.
        pred: Predicted label values 1..N (or model channel + 1), same shape.
    """
    truth = np.asarray(truth).ravel().astype(np.int64)
    pred = np.asarray(pred).ravel().astype(np.int64)
    if truth.shape != pred.shape:
        raise ParameterError(f"truth {truth.shape} and prediction {pred.shape} differ in size")
    keep = (truth > 0) & (truth <= n_classes)
    idx = (truth[keep] - 1) * n_classes + np.clip(pred[keep] - 1, 0, n_classes - 1)
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def iou_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Per-class IoU ``TP / (TP + FP + FN)``; NaN for a class absent from truth and prediction."""
    cm = np.asarray(cm, float)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)


def labelled_iou(truth: np.ndarray, pred: np.ndarray, class_map: ClassMap) -> dict[str, float]:
    """Per-class IoU (``iou_<Name>``) and ``mean_iou`` on labelled pixels only."""
    iou = iou_from_confusion(confusion_matrix(truth, pred, class_map.n_classes))
    out = {f"iou_{n}": float(v) for n, v in zip(class_map.names, iou)}
    out["mean_iou"] = float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
    return out


# --------------------------------------------------------------------------- input pipeline
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


def _fit_multiple(arr: np.ndarray, multiple: int = 32) -> np.ndarray:
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
        img = _read_image(image_path.decode() if isinstance(image_path, bytes) else str(image_path))
        lab = _read_label(label_path.decode() if isinstance(label_path, bytes) else str(label_path))
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
        img, lab = _fit_multiple(np.ascontiguousarray(img)), _fit_multiple(np.ascontiguousarray(lab))
        return img.astype(np.uint8), lab.astype(np.uint8)

    return fn


def make_dataset(image_paths: list[str], label_paths: list[str], batch_size: int, training: bool,
                 augmentation=None, crop_size: int | None = None, seed: int = 0, parallel: int | None = None):
    """A ``tf.data`` pipeline of ``(preprocess(image), label)`` batches from tile files.

    Training: infinite, shuffled, augmented (albumentations in ``tf.numpy_function``, in
    parallel), random crops of ``crop_size``. Validation: one ordered pass, no augmentation.
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
    ds = ds.map(lambda x, y: (preprocess(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    """Training parameters (the notebook's parameters cell maps onto these)."""

    epochs: int = 30
    warmup_epochs: int = 2
    warmup_learning_rate: float = 1e-3
    learning_rate: float = 1e-4
    lr_schedule: str = "cosine"
    batch_size: int = 8
    steps_per_epoch: int | None = None
    crop_size: int | None = None
    val_fraction: float = 0.25
    split_by: str = "auto"
    block_size: float | None = None
    split_margin: float = 0.0
    max_train_tiles: int | None = None
    max_val_tiles: int | None = None
    augment: bool = True
    class_weights: str | None = "auto"
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    focal_gamma: float = 0.0
    encoder_weights: str | None = "imagenet"
    encoder_weights_fallback: str = "error"
    backbone: str = "efficientnetb0"
    decoder_filters: tuple[int, ...] = (256, 128, 64, 32, 16)
    bn_momentum: float = 0.9
    headline_class: str = "Tumor"
    gif_tiles: int = 4
    seed: int = 42
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.epochs < 1:
            raise ParameterError(f"epochs={self.epochs}: must be >= 1")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ParameterError(f"warmup_epochs={self.warmup_epochs}: must be between 0 and epochs={self.epochs}")
        if self.batch_size < 1:
            raise ParameterError(f"batch_size={self.batch_size}: must be >= 1")
        if self.crop_size is not None and self.crop_size % 32:
            raise ParameterError(f"crop_size={self.crop_size}: must be a multiple of 32 (or None)")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ParameterError(f"lr_schedule={self.lr_schedule!r}: use 'cosine' or 'constant'")
        if self.class_weights not in (None, "auto", "none"):
            raise ParameterError(f"class_weights={self.class_weights!r}: use 'auto' or None")


def set_seeds(seed: int) -> None:
    """Seed Python, numpy and TensorFlow (repeatable up to CPU thread scheduling)."""
    import keras

    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)


def _compile(model, loss, lr: float, encoder_trainable: bool, decay_steps: int = 0):
    """Compile with Adam; ``decay_steps`` > 0 decays the rate to 1 % along a cosine over that many steps."""
    import keras

    from helpers.model import set_encoder_trainable

    set_encoder_trainable(model, encoder_trainable)
    rate = keras.optimizers.schedules.CosineDecay(lr, decay_steps, alpha=0.01) if decay_steps > 0 else lr
    model.compile(optimizer=keras.optimizers.Adam(rate), loss=loss, jit_compile=False)


def _epoch_callback_class():
    import keras

    class EpochEnd(keras.callbacks.Callback):
        """Validation on labelled pixels, checkpoints, history and state after every epoch."""

        def __init__(self, trainer: Trainer):
            super().__init__()
            self.t = trainer
            self.t_epoch = time.perf_counter()
            self.c_epoch = time.process_time()

        def on_epoch_begin(self, epoch, logs=None):
            self.t_epoch = time.perf_counter()
            self.c_epoch = time.process_time()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            train_s = time.perf_counter() - self.t_epoch
            self.t.epoch_cpu_seconds.append(time.process_time() - self.c_epoch)
            metrics = self.t.validate()
            logs.update({f"val_{k}": v for k, v in metrics.items()})
            self.t.end_epoch(epoch, dict(logs), train_s)

    return EpochEnd


class Trainer:
    """Holds the data, the model and the output folder of one training run (see :func:`train_model`)."""

    def __init__(self, workdir: str | Path, cfg: TrainConfig, class_map: ClassMap, overwrite: bool, resume: bool):
        self.workdir = Path(workdir)
        self.cfg = cfg
        self.cm = class_map
        self.out = step_dir(self.workdir, "model")
        self.overwrite = overwrite
        self.resume = resume
        self.frame_callback = None
        self.history: list[dict] = []
        self.best_iou = -1.0
        self.best_epoch = -1
        self.epoch_seconds: list[float] = []
        self.epoch_cpu_seconds: list[float] = []
        self.val_seconds: list[float] = []
        self.encoder_weights_start: dict | None = None

    # ---- data
    def prepare_data(self) -> pd.DataFrame:
        cfg = self.cfg
        df, self.source_step = read_tiles(self.workdir, self.cm)
        split_file = self.out / "split.csv"
        if self.resume and split_file.is_file():
            old = pd.read_csv(split_file)
            df = df.merge(old[["tile_id", SPLIT_COLUMN, "group"]], on="tile_id", how="left")
            df[SPLIT_COLUMN] = df[SPLIT_COLUMN].fillna("excluded")
        else:
            df = split_tiles(df, cfg.val_fraction, cfg.split_by, cfg.block_size, cfg.seed, self.cm.names,
                             margin=cfg.split_margin)
        rng = np.random.default_rng(cfg.seed)
        df["used"] = df[SPLIT_COLUMN].isin(["train", "val"]) & (df["px_labelled"] > 0)
        for side, cap in (("train", cfg.max_train_tiles), ("val", cfg.max_val_tiles)):
            idx = df.index[(df[SPLIT_COLUMN] == side) & df["used"]]
            if cap is not None and len(idx) > cap:
                drop = rng.choice(idx, len(idx) - cap, replace=False)
                df.loc[drop, "used"] = False
        self.train_df = df[(df[SPLIT_COLUMN] == "train") & df["used"]].reset_index(drop=True)
        self.val_df = df[(df[SPLIT_COLUMN] == "val") & df["used"]].reset_index(drop=True)
        if self.train_df.empty or self.val_df.empty:
            raise ParameterError(f"split gave {len(self.train_df)} training and {len(self.val_df)} validation tiles "
                                 "with labels; change val_fraction/block_size or add labelled tiles")
        mpps = df["mpp"].round(4).unique()
        if len(mpps) > 1:
            raise HistoUNetError(f"tiles have different mpp {sorted(mpps)}; export all tiles at one resolution")
        self.mpp = float(mpps[0])
        self.tile_size = int(_read_image(self.train_df["image_path"].iloc[0]).shape[0])
        self.split_df = df
        log.info("split by %s: %d train, %d val, %d excluded tiles (%d unlabelled ignored)",
                 cfg.split_by, len(self.train_df), len(self.val_df), int((df[SPLIT_COLUMN] == "excluded").sum()),
                 int((df["px_labelled"] == 0).sum()))
        counts = self.train_df[[f"px_{n}" for n in self.cm.names]].sum().to_numpy()
        self.class_weights = (class_weights_from_counts(counts).tolist()
                              if cfg.class_weights == "auto" else None)
        # validation tiles are few: keep them decoded in memory
        self.val_images = [_fit_multiple(_read_image(p)) for p in self.val_df["image_path"]]
        self.val_labels = [_fit_multiple(_read_label(p)) for p in self.val_df["label_path"]]
        return df

    def datasets(self):
        self.augmentation = load_augmentation(self.workdir, self.cfg.augment)
        return make_dataset(list(self.train_df["image_path"]), list(self.train_df["label_path"]),
                            self.cfg.batch_size, True, self.augmentation, self.cfg.crop_size, self.cfg.seed)

    # ---- evaluation
    def predict_labels(self, images: list[np.ndarray], batch_size: int | None = None) -> list[np.ndarray]:
        """Predicted label images (1..N) for uint8 RGB tiles."""
        from helpers.model import preprocess

        bs = batch_size or max(1, self.cfg.batch_size)
        out = []
        for i in range(0, len(images), bs):
            chunk = images[i:i + bs]
            if len({im.shape for im in chunk}) == 1:
                prob = np.asarray(self.model.predict_on_batch(preprocess(np.stack(chunk))))
                out.extend(np.argmax(prob, -1).astype(np.uint8) + 1)
            else:
                for im in chunk:
                    prob = self.model(preprocess(im[None]), training=False).numpy()
                    out.append(np.argmax(prob[0], -1).astype(np.uint8) + 1)
        return out

    def validate(self) -> dict[str, float]:
        t0 = time.perf_counter()
        preds = self.predict_labels(self.val_images)
        cm = sum(confusion_matrix(t, p, self.cm.n_classes) for t, p in zip(self.val_labels, preds))
        iou = iou_from_confusion(cm)
        out = {f"iou_{n}": float(v) for n, v in zip(self.cm.names, iou)}
        out["mean_iou"] = float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
        out["headline_iou"] = out.get(f"iou_{self.cfg.headline_class}", out["mean_iou"])
        self.last_val_preds = preds
        self.val_seconds.append(time.perf_counter() - t0)
        return out

    # ---- state
    def end_epoch(self, epoch: int, logs: dict, train_s: float) -> None:
        from helpers.io import atomic_path, write_json

        self.epoch_seconds.append(train_s)
        row = {"epoch": epoch + 1, "phase": self.phase, "seconds": round(train_s, 2),
               "cpu_seconds": round(self.epoch_cpu_seconds[-1], 2) if self.epoch_cpu_seconds else None,
               "learning_rate": float(np.asarray(self.model.optimizer.learning_rate))}
        row.update({k: (float(v) if np.ndim(v) == 0 else v) for k, v in logs.items()})
        self.history.append(row)
        iou = row.get("val_headline_iou", float("nan"))
        improved = np.isfinite(iou) and iou > self.best_iou
        with atomic_path(self.out / "last.keras", overwrite=True) as tmp:
            self.model.save(tmp)
        if improved or not (self.out / "best.keras").is_file():
            if improved:
                self.best_iou, self.best_epoch = float(iou), epoch + 1
            with atomic_path(self.out / "best.keras", overwrite=True) as tmp:
                self.model.save(tmp)
        hist = pd.DataFrame(self.history)
        with atomic_path(self.out / "history.csv", overwrite=True) as tmp:
            hist.to_csv(tmp, index=False)
        write_json({"epochs_done": epoch + 1, "best_iou": self.best_iou, "best_epoch": self.best_epoch,
                    "epoch_seconds": self.epoch_seconds, "encoder_weights_start": self.encoder_weights_start,
                    "epoch_cpu_seconds": self.epoch_cpu_seconds, "val_seconds": self.val_seconds},
                   self.out / "training_state.json", overwrite=True)
        if self.frame_callback is not None:
            self.frame_callback(epoch + 1, float(iou), self.last_val_preds)
        log.info("epoch %d/%d (%s) %.0f s  loss %.4f  val %s IoU %.3f  mean IoU %.3f%s", epoch + 1, self.cfg.epochs,
                 self.phase, train_s, row.get("loss", float("nan")), self.cfg.headline_class, iou,
                 row.get("val_mean_iou", float("nan")), "  *best*" if improved else "")

    def load_state(self) -> int:
        """Epochs already done (0 for a fresh run); loads history and best IoU when resuming."""
        state_file = self.out / "training_state.json"
        if not (self.resume and state_file.is_file() and (self.out / "last.keras").is_file()):
            return 0
        state = json.loads(state_file.read_text())
        self.best_iou, self.best_epoch = float(state["best_iou"]), int(state["best_epoch"])
        self.epoch_seconds = list(state.get("epoch_seconds", []))
        self.epoch_cpu_seconds = list(state.get("epoch_cpu_seconds", []))
        self.val_seconds = list(state.get("val_seconds", []))
        if (self.out / "history.csv").is_file():
            self.history = pd.read_csv(self.out / "history.csv").to_dict("records")
        return int(state["epochs_done"])


def train_model(workdir: str | Path, cfg: TrainConfig | None = None, class_map: str | Path | None = None,
                overwrite: bool = False, resume: bool = True, frames: bool = True, verbose: int = 2) -> dict:
    """Train (or resume training of) the U-Net on the work folder's labelled tiles.

    Phases: ``warmup_epochs`` with the encoder frozen at ``warmup_learning_rate`` (skipped,
    with a warning, when the encoder has no pre-trained weights), then the whole network
    at ``learning_rate``. After every epoch: validation IoU on labelled pixels,
    ``last.keras``, ``best.keras`` (best headline/tumour IoU), ``history.csv``, a GIF frame.

    Args:
        workdir: The work folder (reads ``labels/``, writes ``model/``).
        cfg: Training parameters.
        class_map: Class map YAML (default: the project's ``data/classes.yaml``).
        overwrite: Start afresh, replacing an earlier (finished or not) run.
        resume: Continue an interrupted run from ``last.keras`` (epoch counter and optimizer state).
        frames: Save ``frames/epoch_NNN.png`` for the training GIF.
        verbose: Keras fit verbosity (2 = one line per epoch, good for papermill logs).

    Returns:
        The training parameters dict also written to ``model/training_params.yaml``.
    """
    import keras

    from helpers.io import write_yaml
    from helpers.model import build_model, set_batchnorm_momentum

    cfg = cfg or TrainConfig()
    cfg.check()
    cmap = load_class_map(class_map) if class_map else load_class_map()
    out = step_dir(workdir, "model")
    params_file = out / "training_params.yaml"
    state_file = out / "training_state.json"
    t_start, c_start = time.perf_counter(), time.process_time()
    earlier = [p for p in (out.iterdir() if out.is_dir() else []) if p.name != "split.png"]
    if earlier:
        if overwrite:
            import shutil

            for p in out.iterdir():  # the notebook's split.png of this run stays
                if p.name != "split.png":
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        elif resume and state_file.is_file():
            state = json.loads(state_file.read_text())
            if params_file.is_file() and state["epochs_done"] >= cfg.epochs:
                raise OutputExistsError(f"{params_file}: training already finished ({state['epochs_done']} epochs); "
                                        "pass overwrite=True to train again or raise epochs= to continue")
        else:
            raise OutputExistsError(f"{out}: holds an earlier training run; pass overwrite=True to replace it")
    out.mkdir(parents=True, exist_ok=True)
    set_seeds(cfg.seed)
    trainer = Trainer(workdir, cfg, cmap, overwrite, resume)
    split_df = trainer.prepare_data()
    done = trainer.load_state()
    split_df.drop(columns=["image_path", "label_path"]).to_csv(out / "split.csv", index=False)
    cmap.save(out / "classes.yaml")
    loss = make_loss(cmap.n_classes, cfg.ce_weight, cfg.dice_weight, cfg.focal_gamma, trainer.class_weights)

    if done:
        log.info("resuming from %s after epoch %d", out / "last.keras", done)
        trainer.model = keras.models.load_model(out / "last.keras", compile=True)
        from helpers.pretrained import weights_used

        trainer.encoder_weights_start = json.loads(state_file.read_text()).get("encoder_weights_start")
        encoder_used = weights_used(trainer.encoder_weights_start)
    else:
        trainer.model = build_model(cmap.n_classes, cfg.encoder_weights, cfg.backbone, tuple(cfg.decoder_filters),
                                    encoder_weights_fallback=cfg.encoder_weights_fallback)
        encoder_used = trainer.model.encoder_weights_used
        trainer.encoder_weights_start = trainer.model.encoder_weights_start
        set_batchnorm_momentum(trainer.model, cfg.bn_momentum)
    warmup = cfg.warmup_epochs
    if warmup and encoder_used is None:
        log.warning("warm-up with a frozen encoder skipped: the encoder has no pre-trained weights")
        warmup = 0
    from helpers.io import write_json

    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    state.update({"encoder_weights_used": encoder_used, "encoder_weights_start": trainer.encoder_weights_start,
                  "epochs_done": done, "best_iou": trainer.best_iou,
                  "best_epoch": trainer.best_epoch})
    write_json(state, state_file, overwrite=True)

    if frames:
        from helpers.gif import FrameWriter

        writer = FrameWriter(out / "frames", trainer.val_images, trainer.val_labels, cmap,
                             n_tiles=cfg.gif_tiles, headline=cfg.headline_class, seed=cfg.seed,
                             boxes=trainer.val_df[["slide", "x", "y", "w", "h"]].to_numpy().tolist())
        trainer.frame_callback = writer
    train_ds = trainer.datasets()
    steps = cfg.steps_per_epoch or max(1, math.ceil(len(trainer.train_df) / cfg.batch_size))
    callback = _epoch_callback_class()(trainer)
    t_fit, c_fit = time.perf_counter(), time.process_time()
    phases = [("warm-up", 0, warmup, cfg.warmup_learning_rate, False),
              ("fine-tune", warmup, cfg.epochs, cfg.learning_rate, True)]
    for name, first, last, lr, enc_trainable in phases:
        start = max(first, done)
        if start >= last:
            continue
        trainer.phase = name
        resumed_same_phase = done > first and trainer.model.optimizer is not None and trainer.model.compiled
        if resumed_same_phase:
            from helpers.model import set_encoder_trainable

            set_encoder_trainable(trainer.model, enc_trainable)
        else:
            cosine = cfg.lr_schedule == "cosine" and enc_trainable
            _compile(trainer.model, loss, lr, enc_trainable, steps * (last - first) if cosine else 0)
        log.info("%s: epochs %d-%d, lr %.1e, encoder %s", name, start + 1, last, lr,
                 "trainable" if enc_trainable else "frozen")
        trainer.model.fit(train_ds, epochs=last, initial_epoch=start, steps_per_epoch=steps,
                          callbacks=[callback], verbose=verbose, shuffle=False)
        done = last
    fit_s, fit_cpu_s = time.perf_counter() - t_fit, time.process_time() - c_fit

    hist = pd.DataFrame(trainer.history)
    n_epochs_run = len(trainer.epoch_seconds)
    img_per_s = (steps * cfg.batch_size * n_epochs_run / max(sum(trainer.epoch_seconds), 1e-9)
                 if n_epochs_run else float("nan"))
    normalizer = step_dir(workdir, "stain") / "normalizer.json"
    last_row = hist.iloc[-1].to_dict() if len(hist) else {}
    cfg_dict = asdict(cfg)
    cfg_dict.pop("extra")
    cfg_dict["decoder_filters"] = list(cfg.decoder_filters)
    params = {
        "mpp": trainer.mpp,
        "tile_size": trainer.tile_size,
        "input_multiple": 32,
        "backbone": cfg.backbone,
        "n_classes": cmap.n_classes,
        "classes": cmap.to_dict(),
        "normalizer": (str(normalizer.relative_to(workdir)) if normalizer.is_file() and trainer.source_step != "tiles"
                       else None),
        "preprocess": "helpers.model.preprocess (x/255, ImageNet mean/std)",
        "encoder_weights": cfg.encoder_weights,
        "encoder_weights_used": encoder_used,
        "encoder_weights_start": trainer.encoder_weights_start,
        "epochs": cfg.epochs,
        "warmup_epochs_run": warmup,
        "seed": cfg.seed,
        "split": {"by": cfg.split_by if cfg.split_by != "auto" else
                  ("slide" if split_df["slide"].nunique() >= 3 else "region"),
                  "block_size": cfg.block_size, "margin": cfg.split_margin, "val_fraction": cfg.val_fraction, "file": "split.csv",
                  "n_train": len(trainer.train_df), "n_val": len(trainer.val_df),
                  "n_excluded": int((split_df[SPLIT_COLUMN] == "excluded").sum())},
        "source": trainer.source_step,
        "class_weights": trainer.class_weights,
        "augmentation": (str(step_dir(workdir, "augment").relative_to(workdir) / "augment.yaml")
                         if getattr(trainer, "augmentation", None) is not None else None),
        "best_tumor_iou": trainer.best_iou,
        "best_epoch": trainer.best_epoch,
        "headline_class": cfg.headline_class,
        "last_val": {k: v for k, v in last_row.items() if str(k).startswith("val_")},
        "timings": {"total_s": round(time.perf_counter() - t_start, 1), "fit_s": round(fit_s, 1),
                    "total_cpu_s": round(time.process_time() - c_start, 1), "fit_cpu_s": round(fit_cpu_s, 1),
                    "load_average_1min": round(os.getloadavg()[0], 1),
                    "epoch_s": [round(s, 1) for s in trainer.epoch_seconds],
                    "val_s_per_epoch": round(float(np.mean(trainer.val_seconds)), 2) if trainer.val_seconds else None,
                    "train_images_per_s": round(img_per_s, 2)},
        "steps_per_epoch": steps,
        "config": cfg_dict,
    }
    write_yaml(params, params_file, overwrite=True)
    return params


def plot_history(history: pd.DataFrame | str | Path, headline: str = "Tumor", class_map: ClassMap | None = None):
    """Figure: training loss and validation IoU (per class, mean) against epoch."""
    import matplotlib.pyplot as plt

    h = pd.read_csv(history) if isinstance(history, (str, Path)) else history
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(h["epoch"], h["loss"], "o-", label="training loss")
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
    a2.set_ylabel("validation IoU (labelled pixels)")
    a2.legend(fontsize=8)
    if "phase" in h and (h["phase"] == "warm-up").any():
        x = h.loc[h["phase"] == "warm-up", "epoch"].max() + 0.5
        for a in (a1, a2):
            a.axvline(x, color="grey", ls=":", lw=1)
    fig.tight_layout()
    return fig


def preview_split(workdir: str | Path, cfg: TrainConfig | None = None, class_map: str | Path | None = None,
                  use_saved: bool = True) -> pd.DataFrame:
    """The train/val/excluded split :func:`train_model` will use (same seed), without training.

    A resumed run keeps the split saved in ``model/split.csv`` (``use_saved``).
    """
    cfg = cfg or TrainConfig()
    cmap = load_class_map(class_map) if class_map else load_class_map()
    saved = step_dir(workdir, "model") / "split.csv"
    if use_saved and saved.is_file():
        return pd.read_csv(saved)
    df, _ = read_tiles(workdir, cmap)
    return split_tiles(df, cfg.val_fraction, cfg.split_by, cfg.block_size, cfg.seed, cmap.names, margin=cfg.split_margin)


def plot_split(split: pd.DataFrame, max_slides: int = 4):
    """Figure: tile footprints per slide coloured by split (train / val / excluded)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    colors = {"train": "tab:blue", "val": "tab:orange", "excluded": "lightgrey"}
    slides = list(split["slide"].unique())[:max_slides]
    fig, axes = plt.subplots(1, len(slides), figsize=(5 * len(slides), 5), squeeze=False)
    for ax, slide in zip(axes[0], slides):
        sub = split[split["slide"] == slide]
        for r in sub.itertuples():
            ax.add_patch(Rectangle((r.x, r.y), r.w, r.h, facecolor=colors.get(getattr(r, SPLIT_COLUMN), "white"),
                                   edgecolor="k", lw=0.3, alpha=0.75))
        ax.set_xlim(sub["x"].min(), (sub["x"] + sub["w"]).max())
        ax.set_ylim((sub["y"] + sub["h"]).max(), sub["y"].min())
        ax.set_aspect("equal")
        counts = sub[SPLIT_COLUMN].value_counts().to_dict()
        ax.set_title(f"{slide}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), fontsize=9)
        ax.set_xlabel("x (level-0 px)")
    axes[0][0].legend(handles=[Patch(color=c, label=k) for k, c in colors.items()], loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig
