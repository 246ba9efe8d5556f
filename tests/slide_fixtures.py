"""Synthetic slides and a per-pixel colour 'model' for the inference tests (07).

Imported by tests/test_predict.py, tests/test_export.py and tests/test_batch.py (tests/ is on sys.path).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers.config import load_class_map

ROOT = Path(__file__).resolve().parent.parent


#: Colours of the synthetic slide, one per class of data/classes.yaml (label 1..4).
COLOURS = {1: (242, 242, 242), 2: (95, 40, 135), 3: (235, 150, 195), 4: (245, 215, 110)}


def make_colour_model(model_dir: Path, class_map, mpp: float = 1.0, tile_size: int = 64,
                      normalizer: str | None = None) -> Path:
    """A tiny per-pixel 'U-Net' stand-in: nearest class colour, as a 1x1 convolution.

    Being per-pixel, its stitched whole-slide output must equal the model applied to the
    whole image at once, whatever the tiling: that is what the stitching tests check.
    """
    import keras

    from helpers.io import write_yaml
    from helpers.model import preprocess

    cents = preprocess(np.array([COLOURS[c.label] for c in class_map.classes], np.uint8)[None])[0]  # (C, 3)
    w = 2 * cents.T * 4.0
    b = -(cents**2).sum(1) * 4.0
    inp = keras.Input((None, None, 3))
    out = keras.layers.Conv2D(len(cents), 1, activation="softmax")(inp)
    model = keras.Model(inp, out)
    model.layers[-1].set_weights([w[None, None].astype(np.float32), b.astype(np.float32)])
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save(model_dir / "best.keras")
    write_yaml({"mpp": mpp, "tile_size": tile_size, "classes": class_map.to_dict(), "normalizer": normalizer},
               model_dir / "training_params.yaml", overwrite=True)
    (model_dir / "training_state.json").write_text('{"encoder_weights_start": {"source": "none", "text": "none (random)"}}')
    return model_dir


def synthetic_image(width: int = 400, height: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """RGB image + its true labels: glass, a stroma block with a tumour ring (a hole) and 'other'."""
    import cv2

    lab = np.ones((height, width), np.uint8)
    cv2.rectangle(lab, (20, 20), (width - 60, height - 30), 3, -1)
    cv2.circle(lab, (width // 3, height // 2), min(width, height) // 3, 2, -1)
    cv2.circle(lab, (width // 3, height // 2), min(width, height) // 8, 3, -1)
    cv2.rectangle(lab, (width - 120, 40), (width - 80, height - 60), 4, -1)
    lut = np.zeros((256, 3), np.uint8)
    for k, c in COLOURS.items():
        lut[k] = c
    rng = np.random.default_rng(seed)
    img = np.clip(lut[lab].astype(np.int16) + rng.integers(-6, 7, lab.shape + (3,)), 0, 255).astype(np.uint8)
    return img, lab


def write_slide(path: Path, img: np.ndarray, mpp: float | None = 0.5) -> Path:
    """A tiled pyramidal TIFF OpenSlide opens (zlib, so colours are exact)."""
    from helpers.rasters import write_pyramid_tiff

    h, w = img.shape[:2]
    write_pyramid_tiff(path, img, width=w, height=h, channels=3, kind="rgb", compression="zlib", tile=128,
                       mpp=mpp, downsample=1.0, overwrite=True)
    return path


@pytest.fixture(scope="module")
def class_map_():
    return load_class_map(ROOT / "data" / "classes.yaml")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, class_map_):
    """A colour model (1 um/px, 64 px tiles) and a 0.5 um/px synthetic slide with glass around it."""
    d = tmp_path_factory.mktemp("infer")
    make_colour_model(d / "model", class_map_, mpp=1.0, tile_size=64)
    img, lab = synthetic_image(640, 480)
    big = np.full((480 + 200, 640 + 300, 3), COLOURS[1], np.uint8)  # extra glass: tiles to skip
    big[:480, :640] = img
    truth = np.ones(big.shape[:2], np.uint8)
    truth[:480, :640] = lab
    write_slide(d / "slide.tiff", big, mpp=0.5)
    return d, big, truth
