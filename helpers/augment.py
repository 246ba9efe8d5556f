"""Augmentation (step 04): an albumentations preset for H&E tiles and their label masks.

The pipeline is saved with albumentations' own serialization (``augment/augment.yaml``)
and training loads the very same file with :func:`load_augmentation`. Apply it as
``out = aug(image=img, mask=mask)``.

Label rule: masks go through the same geometric transforms with nearest-neighbour
interpolation, so no new label values appear; wherever a transform has to invent pixels
(zoom out, rotation corners, elastic borders) the mask is filled with 0 = unlabelled
(ignored by the loss), never a class, and the image with white (glass).

The HED stain jitter is :class:`HEDJitter` (an ``ImageOnlyTransform`` defined here):
albumentations' own ``HEStain`` projects every pixel onto two stains and so changes a
tile even at zero jitter (mean 8, up to 57 grey levels on a real tile), whereas the
three-channel HED colour deconvolution (scikit-image's stain matrix) is invertible.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# albumentations asks the network for a newer version at import unless told not to;
# this project pins it and runs offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402
import cv2
import numpy as np

from helpers.errors import HistoUNetError, ParameterError

log = logging.getLogger(__name__)

#: Image fill for pixels a geometric transform invents: white, like glass on a slide.
IMAGE_FILL = (255, 255, 255)
#: Mask fill: 0 = unlabelled, ignored by the loss. Never a class.
MASK_FILL = 0


class HEDJitter(A.ImageOnlyTransform):
    """Random stain variation in HED (hematoxylin, eosin, DAB) optical-density space.

    Each of the three stain channels of :func:`skimage.color.rgb2hed` is scaled by
    ``U(1 - sigma, 1 + sigma)`` and shifted by ``U(-bias, bias)`` (Tellez et al. 2018),
    then converted back to RGB. At ``sigma = bias = 0`` the tile is unchanged.

    Args:
        sigma: Relative scale jitter of each stain (0.05 = +-5 %).
        bias: Additive jitter of each stain's optical density.
        p: Probability of applying the transform.
    """

    def __init__(self, sigma: float = 0.05, bias: float = 0.01, p: float = 0.5):
        super().__init__(p=p)
        if sigma < 0 or bias < 0:
            raise ParameterError(f"HEDJitter: sigma={sigma} and bias={bias} must be >= 0")
        self.sigma = float(sigma)
        self.bias = float(bias)

    def get_params(self) -> dict[str, Any]:
        rng = self.random_generator
        return {"alpha": rng.uniform(1 - self.sigma, 1 + self.sigma, 3),
                "beta": rng.uniform(-self.bias, self.bias, 3)}

    def apply(self, img: np.ndarray, alpha: np.ndarray = np.ones(3), beta: np.ndarray = np.zeros(3),
              **params: Any) -> np.ndarray:
        from skimage.color import hed_from_rgb, rgb_from_hed

        is_uint8 = img.dtype == np.uint8
        rgb = img[..., :3].astype(np.float32) / 255.0 if is_uint8 else img[..., :3].astype(np.float32)
        # optical density -> stains (skimage's Ruifrok-Johnston matrix) without clipping, so the
        # round trip is exact; then jitter and back
        od = -np.log(np.clip(rgb, 1.0 / 255.0, 1.0))
        hed = od @ hed_from_rgb.astype(np.float32)
        hed = hed * alpha.astype(np.float32) + beta.astype(np.float32)
        out = np.exp(-(hed @ rgb_from_hed.astype(np.float32)))
        np.clip(out, 0.0, 1.0, out=out)
        if is_uint8:
            out = np.rint(out * 255.0).astype(np.uint8)
        else:
            out = out.astype(img.dtype)
        if img.shape[-1] > 3:
            out = np.concatenate([out, img[..., 3:]], axis=-1)
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("sigma", "bias")


def default_augmentation(flip: float = 0.5, rotate90: float = 0.75, scale: float = 0.1, rotate: float = 0.0,
                         elastic: float = 0.0, blur: float = 1.0, noise: float = 0.03, brightness: float = 0.1,
                         contrast: float = 0.1, hed_sigma: float = 0.05, hed_bias: float = 0.01,
                         seed: int | None = None) -> A.Compose:
    """The histology preset; every strength set to 0 leaves its transform out.

    Args:
        flip: Probability of a horizontal and (independently) of a vertical flip.
        rotate90: Probability of a random multiple-of-90-degree rotation.
        scale: Zoom range +-``scale`` (0.1 = 90-110 %), applied with probability 0.5.
        rotate: Free rotation range +-degrees (corners are filled: white image, unlabelled mask).
        elastic: Elastic deformation strength (displacement scale in pixels, e.g. 20), probability 0.3.
        blur: Largest Gaussian blur sigma in pixels (probability 0.2).
        noise: Largest Gaussian noise std as a fraction of 255 (probability 0.2).
        brightness: Brightness range +-(fraction); probability 0.5 together with contrast.
        contrast: Contrast range +-(fraction).
        hed_sigma: HED stain scale jitter +-(fraction), probability 0.5 (see :class:`HEDJitter`).
        hed_bias: HED stain shift jitter +-(optical density).
        seed: Seed for reproducible draws (None = random).

    Returns:
        An ``A.Compose``; call it as ``aug(image=img, mask=mask)``.
    """
    vals = dict(flip=flip, rotate90=rotate90, scale=scale, rotate=rotate, elastic=elastic, blur=blur, noise=noise,
                brightness=brightness, contrast=contrast, hed_sigma=hed_sigma, hed_bias=hed_bias)
    bad = [f"{k}={v}" for k, v in vals.items() if not (isinstance(v, (int, float)) and v >= 0)]
    if bad:
        raise ParameterError(f"augmentation strengths must be numbers >= 0; got {', '.join(bad)}")
    for k in ("flip", "rotate90"):
        if vals[k] > 1:
            raise ParameterError(f"augmentation {k}={vals[k]} is a probability; use 0..1")
    if scale >= 0.5:
        raise ParameterError(f"augmentation scale={scale} is too strong for histology (cells change size); use < 0.5")
    geo = dict(border_mode=cv2.BORDER_CONSTANT, fill=IMAGE_FILL, fill_mask=MASK_FILL,
               mask_interpolation=cv2.INTER_NEAREST, interpolation=cv2.INTER_LINEAR)
    t: list[A.BasicTransform] = []
    if flip > 0:
        t += [A.HorizontalFlip(p=flip), A.VerticalFlip(p=flip)]
    if rotate90 > 0:
        t.append(A.RandomRotate90(p=rotate90))
    if scale > 0 or rotate > 0:
        t.append(A.Affine(scale=(1 - scale, 1 + scale), rotate=(-rotate, rotate) if rotate else 0.0, p=0.5, **geo))
    if elastic > 0:
        t.append(A.ElasticTransform(alpha=float(elastic), sigma=max(4.0, float(elastic) / 2), p=0.3, **geo))
    if blur > 0:
        t.append(A.GaussianBlur(blur_limit=0, sigma_limit=(min(0.1, blur), blur), p=0.2))
    if noise > 0:
        t.append(A.GaussNoise(std_range=(0.0, min(noise, 1.0)), p=0.2))
    if brightness > 0 or contrast > 0:
        t.append(A.RandomBrightnessContrast(brightness_limit=(-brightness, brightness),
                                            contrast_limit=(-contrast, contrast), p=0.5))
    if hed_sigma > 0 or hed_bias > 0:
        t.append(HEDJitter(sigma=hed_sigma, bias=hed_bias, p=0.5))
    return A.Compose(t, mask_interpolation=cv2.INTER_NEAREST, seed=seed)


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return "yaml"
    if suffix == ".json":
        return "json"
    raise ParameterError(f"{path}: augmentation files end in .yaml or .json")


def save_augmentation(aug: A.BaseCompose, path: str | Path, overwrite: bool = False,
                      fingerprint: dict | None = None) -> Path:
    """Write the pipeline with albumentations' serialization (YAML or JSON by suffix), atomically.

    With ``fingerprint`` (step 04's strengths, :func:`helpers.steps.fingerprint_of`), a
    finished folder made with the same one is reused and the file left untouched.
    """
    from helpers.io import atomic_path
    from helpers.steps import reuse_or_guard

    path = Path(path)
    fmt = _format(path)
    if fingerprint is not None and reuse_or_guard(path.parent, fingerprint, overwrite, "augmentation",
                                                  in_place=True, guard=False):
        return path
    with atomic_path(path, overwrite) as tmp:
        A.save(aug, str(tmp), data_format=fmt)
    return path


def load_augmentation(path: str | Path) -> A.Compose:
    """Read a pipeline written by :func:`save_augmentation` (``augment/augment.yaml``).

    Raises:
        HistoUNetError: the file is missing or not an albumentations pipeline.
    """
    path = Path(path)
    if not path.is_file():
        raise HistoUNetError(f"{path}: augmentation pipeline not found; run 04_augment_tiles.ipynb first")
    try:
        aug = A.load(str(path), data_format=_format(path))
    except (KeyError, ValueError, TypeError) as exc:
        raise HistoUNetError(f"{path}: not an albumentations pipeline ({exc}); re-run 04_augment_tiles") from None
    if not isinstance(aug, A.BaseCompose):
        raise HistoUNetError(f"{path}: expected an albumentations Compose; re-run 04_augment_tiles")
    return aug


def describe_augmentation(aug: A.BaseCompose) -> list[str]:
    """One line per transform: name, probability and its main settings."""
    lines = []
    for t in aug.transforms:
        args = {k: v for k, v in t.get_transform_init_args().items()
                if k not in ("p", "interpolation", "mask_interpolation", "border_mode", "fill", "fill_mask",
                             "approximate", "same_dxdy", "noise_distribution", "keypoint_remapping_method",
                             "rotate_method", "balanced_scale", "fit_output", "keep_ratio", "translate_px",
                             "translate_percent", "shear", "mean_range", "per_channel", "noise_scale_factor",
                             "brightness_by_max", "ensure_safe_range", "blur_limit")}
        lines.append(f"{type(t).__name__:<26} p={t.p:.2f}  " + ", ".join(f"{k}={v}" for k, v in args.items()))
    return lines


def load_pairs(manifest: str | Path, workdir: str | Path | None = None, n: int = 4, seed: int = 0,
               min_labelled: float = 0.05) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Read ``n`` image/label tile pairs from a tile manifest (preferring well-labelled tiles)."""
    from helpers.io import read_image, read_manifest

    manifest = Path(manifest)
    root = Path(workdir) if workdir is not None else manifest.resolve().parent.parent
    df = read_manifest(manifest, "01_export_tiles.ipynb")
    if not len(df):
        raise HistoUNetError(f"{manifest}: no tiles listed; run the tile export with a larger region")
    if "px_unlabelled" in df.columns:
        total = (df["w"] / df["downsample"]).round() * (df["h"] / df["downsample"]).round() if {"w", "h", "downsample"} <= set(df.columns) else None
        if total is not None:
            labelled = 1 - df["px_unlabelled"] / total.clip(lower=1)
            good = df[labelled >= min_labelled]
            df = good if len(good) >= min(n, len(df)) else df
    rows = df.sample(min(n, len(df)), random_state=seed)
    images = [read_image(root / p) for p in rows["image"]]
    masks = [read_image(root / p) for p in rows["label"]]
    masks = [m[..., 0] if m.ndim == 3 else m for m in masks]
    return images, masks, rows["tile_id"].astype(str).tolist()


def check_label_safety(aug: A.BaseCompose, masks: Sequence[np.ndarray], images: Sequence[np.ndarray] | None = None,
                       rounds: int = 20, seed: int = 0) -> dict[str, Any]:
    """Run the pipeline ``rounds`` times per mask; count new label values and labelled padding.

    Padding is found by augmenting an all-black marker image alongside: pixels that come out
    white were invented by a transform and must be unlabelled (0). Photometric transforms
    do not touch masks, so only the geometry matters here.

    Returns:
        ``{"runs", "new_label_values", "labelled_padding_pixels", "padding_pixels"}``; both
        counts are 0 for a safe pipeline.
    """
    geo = A.Compose([t for t in aug.transforms if isinstance(t, A.DualTransform)], seed=seed)
    new_values, bad_pad, pad = 0, 0, 0
    runs = 0
    for i, mask in enumerate(masks):
        allowed = set(np.unique(mask).tolist()) | {MASK_FILL}
        h, w = mask.shape[:2]
        marker = np.zeros((h, w, 3), np.uint8)
        for _ in range(rounds):
            out = geo(image=marker, mask=np.ascontiguousarray(mask))
            runs += 1
            new_values += len(set(np.unique(out["mask"]).tolist()) - allowed)
            padded = out["image"].min(axis=2) > 250
            pad += int(padded.sum())
            bad_pad += int((out["mask"][padded] != MASK_FILL).sum())
    return {"runs": runs, "new_label_values": new_values, "labelled_padding_pixels": bad_pad, "padding_pixels": pad}
