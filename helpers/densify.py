"""Denser training labels from sparse strokes (step 03, optional): a pixel classifier as the teacher.

A pathologist's strokes cover about a tenth of the tissue. QuPath's answer to "learn
this tissue from my strokes" is its pixel classifier: filter responses of the image at
several scales, fed to a random forest trained on the annotated pixels. On the real-data
benchmark (``benchmarks/pixel_classifier_real.py``) that classifier, trained on the
same strokes, scores about as well on held-out tissue as the U-Net. Here it labels the
pixels nobody annotated, where it is confident, so the U-Net trains on more of the
tissue (``densify: forest`` in 03; ``forest_mlp``: the mean of the forest and a small neural network).

Per slide, the tiles of the manifest are put back together on the slide's tile grid (the
union of the tiles, one pixel once, however much they overlap), features are computed
once, a random forest is fitted to at most ``per_class`` labelled pixels per class, and
every unlabelled pixel whose winning class has a forest probability of at least
``confidence`` takes that class. Annotated (refined) labels are never changed.

Features (:func:`pixel_features`) per channel (haematoxylin and eosin optical densities
by colour deconvolution, and the grey level) and scale (sigma 1, 2, 4, 8 um): Gaussian,
Laplacian of Gaussian, gradient magnitude, the two Hessian eigenvalues, the two
structure-tensor eigenvalues and the Gaussian-weighted standard deviation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from helpers.errors import ParameterError

log = logging.getLogger(__name__)

SIGMAS_UM: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
#: ``forest``: a random forest (QuPath's "Random trees"); ``forest_mlp``: the mean of that forest's and a small
#: neural network's probabilities (QuPath's "ANN_MLP": one hidden layer of 32 units on standardized features).
METHODS = ("forest", "forest_mlp")
#: A slide's tiles are put together only when the union's bounding box has at most this many pixels
#: (per tile otherwise: the same labels, features cut at tile borders).
MAX_CANVAS_PX = 64_000_000


def channels(rgb: np.ndarray) -> np.ndarray:
    """``(h, w, 3)`` float32: haematoxylin and eosin optical densities, and the grey level (0-1)."""
    from skimage.color import rgb2hed

    hed = rgb2hed(np.ascontiguousarray(rgb[..., :3]))
    grey = rgb[..., :3].astype(np.float32).mean(-1) / 255.0
    return np.dstack([hed[..., 0], hed[..., 1], grey]).astype(np.float32)


def pixel_features(rgb: np.ndarray, mpp: float, sigmas_um: tuple[float, ...] = SIGMAS_UM) -> np.ndarray:
    """``(h, w, 3 * len(sigmas_um) * 8)`` float32 filter responses of an RGB image at ``mpp`` um/px."""
    from scipy import ndimage as ndi

    chan = channels(rgb)
    out = []
    for c in range(chan.shape[-1]):
        x = chan[..., c]
        for s in (s_um / mpp for s_um in sigmas_um):
            g = ndi.gaussian_filter(x, s)
            gy, gx = ndi.gaussian_filter(x, s, order=(1, 0)), ndi.gaussian_filter(x, s, order=(0, 1))
            hyy, hxx = ndi.gaussian_filter(x, s, order=(2, 0)), ndi.gaussian_filter(x, s, order=(0, 2))
            hxy = ndi.gaussian_filter(x, s, order=(1, 1))
            root = np.sqrt(((hxx - hyy) / 2) ** 2 + hxy ** 2)
            # structure tensor: products of the gradient, integrated at twice the scale
            jxx, jyy, jxy = (ndi.gaussian_filter(a, 2 * s) for a in (gx * gx, gy * gy, gx * gy))
            troot = np.sqrt(((jxx - jyy) / 2) ** 2 + jxy ** 2)
            sd = np.sqrt(np.maximum(ndi.gaussian_filter(x * x, s) - g * g, 0))
            out += [g, hxx + hyy, np.hypot(gx, gy), (hxx + hyy) / 2 + root, (hxx + hyy) / 2 - root,
                    (jxx + jyy) / 2 + troot, (jxx + jyy) / 2 - troot, sd]
    return np.stack(out, -1).astype(np.float32)


def fit_forest(x: np.ndarray, y: np.ndarray, seed: int = 0, trees: int = 64, depth: int = 16):
    """A random forest on ``x`` (n, f) with labels ``y`` (n,): QuPath's "Random trees" kind of classifier."""
    from sklearn.ensemble import RandomForestClassifier

    model = RandomForestClassifier(n_estimators=trees, max_depth=depth, min_samples_leaf=5, max_features="sqrt",
                                   n_jobs=-1, random_state=seed)
    model.fit(x, y)
    return model


def fit_mlp(x: np.ndarray, y: np.ndarray, seed: int = 0):
    """A small neural network on standardized ``x`` (n, f): QuPath's "ANN_MLP" kind of classifier."""
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(32,), max_iter=500, random_state=seed))
    model.fit(x, y)
    return model


class SoftVote:
    """The mean of several fitted classifiers' probabilities (the same ``classes_``), as one classifier."""

    def __init__(self, models: list):
        if any(list(m.classes_) != list(models[0].classes_) for m in models):
            raise ValueError("SoftVote: the classifiers were fitted to different classes")
        self.models = list(models)
        self.classes_ = models[0].classes_

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """``(n, len(classes_))`` mean probability."""
        return np.mean([m.predict_proba(x) for m in self.models], axis=0)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The class of highest mean probability."""
        return self.classes_[self.predict_proba(x).argmax(1)]


def check_method(method: str | None) -> None:
    """One-line error unless ``method`` is None (off) or one of :data:`METHODS` (03's ``densify``)."""
    if method not in (None, *METHODS):
        raise ParameterError(f"densify={method!r}: use None (off) or one of {', '.join(METHODS)}")


def fit_teacher(x: np.ndarray, y: np.ndarray, method: str = "forest", seed: int = 0):
    """The pixel classifier of ``method`` (one of :data:`METHODS`) fitted to ``x`` (n, f), ``y`` (n,)."""
    check_method(method)
    forest = fit_forest(x, y, seed)
    return SoftVote([forest, fit_mlp(x, y, seed)]) if method == "forest_mlp" else forest


def _sample(lab: np.ndarray, mask: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Flat indices of at most ``per_class`` random pixels of each class of ``lab`` inside ``mask``."""
    flat, m = lab.ravel(), mask.ravel()
    picks = [rng.permutation(np.flatnonzero(m & (flat == c)))[:per_class] for c in np.unique(flat[m & (flat > 0)])]
    return np.concatenate(picks) if picks else np.zeros(0, np.int64)


def densify(keys: list, load: Callable[[Any], tuple[np.ndarray, np.ndarray, np.ndarray | None, float]],
            save: Callable[[Any, np.ndarray], None], *, confidence: float = 0.8, per_class: int = 20_000,
            seed: int = 0, features: Callable[[np.ndarray, float], np.ndarray] = pixel_features,
            progress: bool = False, keep_model: Callable[[Any], None] | None = None, method: str = "forest") -> dict:
    """Fit the forest to the labelled pixels of every image, then label the confident unlabelled ones.

    Two passes over ``keys`` (features are computed twice rather than held: a cohort's
    images need not fit in memory): the first samples at most ``per_class`` labelled
    pixels per class and image, the second predicts the unlabelled pixels and calls ``save``.

    Args:
        keys: One key per image.
        load: ``load(key) -> (rgb, labels, covered or None, mpp)``; only ``covered`` pixels are
            sampled and predicted (None: all).
        save: ``save(key, new_labels)``; the new labels equal ``labels`` wherever those are non-zero.
        confidence: Forest probability a pixel's winning class needs (0-1].
        per_class: Labelled pixels per class the forest is fitted to (at most).
        seed: Random seed (sampling and forest).
        features: ``features(rgb, mpp) -> (h, w, f)``.
        progress: Show progress bars.
        keep_model: Called with the fitted classifier (e.g. to keep it for 07, :mod:`helpers.teacher`).
        method: The classifier, one of :data:`METHODS`.

    Returns:
        ``{"classes", "training_px", "added_px", "added_by_class"}`` (class labels as ints).
    """
    from tqdm.auto import tqdm

    if not 0.0 < confidence <= 1.0:
        raise ParameterError(f"densify_confidence must be in (0, 1]; got {confidence}")
    check_method(method or "")  # None is "off" for 03, not a classifier here
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for k in tqdm(keys, desc="densify: sample strokes", unit="image", disable=not progress):
        rgb, lab, cov, mpp = load(k)
        idx = _sample(lab, np.ones(lab.shape, bool) if cov is None else cov, per_class, rng)
        if len(idx):
            xs.append(features(rgb, mpp).reshape(lab.size, -1)[idx])
            ys.append(lab.ravel()[idx])
    y = np.concatenate(ys) if ys else np.zeros(0, np.uint8)
    classes = np.unique(y)
    info: dict = {"classes": [int(c) for c in classes], "training_px": 0, "added_px": 0, "added_by_class": {}}
    if len(classes) < 2:
        log.warning("densify: %d labelled class(es); a classifier needs two: labels unchanged", len(classes))
        for k in keys:
            save(k, np.array(load(k)[1], np.uint8, copy=True))
        return info
    x = np.concatenate(xs)
    keep = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in classes])
    info["training_px"] = int(len(keep))
    model = fit_teacher(x[keep], y[keep], method, seed)
    if keep_model is not None:
        keep_model(model)
    del x, xs
    added: dict[int, int] = {}
    for k in tqdm(keys, desc="densify: label unlabelled pixels", unit="image", disable=not progress):
        rgb, lab, cov, mpp = load(k)
        todo = (lab == 0) if cov is None else (lab == 0) & cov
        new = np.array(lab, np.uint8, copy=True)
        if todo.any():
            proba = model.predict_proba(features(rgb, mpp)[todo])
            win = proba.argmax(1)
            sure = proba[np.arange(len(win)), win] >= confidence
            vals = np.zeros(len(win), np.uint8)
            vals[sure] = model.classes_[win[sure]]
            new[todo] = vals
            for c, n in zip(*np.unique(vals[sure], return_counts=True)):
                added[int(c)] = added.get(int(c), 0) + int(n)
        save(k, new)
    info["added_by_class"] = added
    info["added_px"] = int(sum(added.values()))
    return info


def densify_images(images: list[np.ndarray], labels: list[np.ndarray], mpp: float, **kwargs: Any) -> tuple[list[np.ndarray], dict]:
    """:func:`densify` on images held in memory; returns the new labels and the info."""
    out: dict[int, np.ndarray] = {}
    info = densify(list(range(len(images))), lambda i: (images[i], np.asarray(labels[i], np.uint8), None, mpp),
                   out.__setitem__, **kwargs)
    return [out[i] for i in range(len(images))], info


def tile_canvases(rows: list[dict], tile_px: list[tuple[int, int]]) -> dict[str, dict]:
    """Per slide, where each tile sits on a canvas of the slide's tile grid (``{slide: {"shape", "offsets"}}``).

    ``rows`` are manifest rows (``slide``, ``x``, ``y``, ``downsample``), ``tile_px`` each tile's
    (h, w). A slide whose canvas would exceed :data:`MAX_CANVAS_PX` gets one canvas per tile.
    """
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(f"{r['slide']}|{float(r['downsample']):.6g}", []).append(i)
    out: dict[str, dict] = {}
    for key, idx in groups.items():
        pos = [(int(round(rows[i]["y"] / float(rows[i]["downsample"]))),
                int(round(rows[i]["x"] / float(rows[i]["downsample"])))) for i in idx]
        y0, x0 = min(p[0] for p in pos), min(p[1] for p in pos)
        h = max(p[0] + tile_px[i][0] for p, i in zip(pos, idx)) - y0
        w = max(p[1] + tile_px[i][1] for p, i in zip(pos, idx)) - x0
        if h * w <= MAX_CANVAS_PX:
            out[key] = {"shape": (h, w), "tiles": {i: (p[0] - y0, p[1] - x0) for p, i in zip(pos, idx)}}
        else:
            log.info("densify: %s: the tiles span %dx%d px; one canvas per tile", key, w, h)
            for p, i in zip(pos, idx):
                out[f"{key}|{i}"] = {"shape": tile_px[i], "tiles": {i: (0, 0)}}
    return out
