"""Training input pipeline throughput versus training step throughput (tiles/s).

Target: the ``tf.data`` pipeline (read PNG tiles, albumentations augmentation in
parallel, preprocess, batch, prefetch) delivers tiles several times faster than the
U-Net trains on them, so the pipeline is never the bottleneck.

Usage::

    python -m benchmarks.bench_input_pipeline [--workdir runs/demo] [--tile 256] [--batch 8] [--steps 6]

Set-up (documented choices):

* **Tiles**: ``workdir/labels`` if given and present (e.g. the demo's), else a synthetic
  folder of ``--n`` textured 256 px tiles with sparse labels written to a temporary workdir.
* **Augmentation**: the workdir's ``augment/augment.yaml`` if present, else the project's
  default preset (:func:`helpers.augment.default_augmentation`), so the albumentations
  cost is real.
* **Pipeline**: :func:`helpers.dataset.make_dataset` exactly as training uses it; timed over
  ``--batches`` batches after one warm-up batch, alone (no model running).
* **Training**: Unet/EfficientNet-B0 (random weights; speed does not depend on them),
  ``model.fit`` on the same pipeline; the first (graph tracing) epoch is excluded.
* Figures in wall-clock seconds and in process CPU seconds per tile (the cores are
  shared with other processes on this machine, CPU time is less distorted by that).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}"


def _synthetic_workdir(root: Path, n: int, tile: int) -> Path:
    import cv2
    import pandas as pd

    from helpers.io import write_image

    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(n))) * tile
    yy, xx = np.mgrid[0:side, 0:side]
    truth = np.full((side, side), 3, np.uint8)
    for _ in range(n):
        cy, cx, r = rng.integers(0, side, 2).tolist() + [int(rng.integers(tile // 4, tile))]
        truth[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 2
    img = np.stack([np.where(truth == 2, c1, c2) for c1, c2 in ((90, 230), (40, 150), (120, 190))], -1).astype(np.float32)
    img = cv2.GaussianBlur(img + rng.normal(0, 20, img.shape), (3, 3), 0).clip(0, 255).astype(np.uint8)
    sparse = np.where((xx // 6 + yy // 9) % 3 == 0, truth, 0).astype(np.uint8)
    rows = []
    for k in range(n):
        y, x = (k // (side // tile)) * tile, (k % (side // tile)) * tile
        tid = f"bench [d=1,x={x},y={y},w={tile},h={tile}]"
        lab = sparse[y:y + tile, x:x + tile]
        write_image(img[y:y + tile, x:x + tile], root / "labels" / "tiles" / f"{tid}.png")
        write_image(lab, root / "labels" / "tiles" / f"{tid}-labelled.png")
        rows.append(dict(tile_id=tid, slide="bench", image=f"labels/tiles/{tid}.png",
                         label=f"labels/tiles/{tid}-labelled.png", x=x, y=y, w=tile, h=tile, mpp=1.0))
    pd.DataFrame(rows).to_csv(root / "labels" / "manifest.csv", index=False)
    return root


def _augmentation(workdir: Path):
    from helpers import augment

    path = workdir / "augment" / "augment.yaml"
    if path.is_file():
        return augment.load_augmentation(path), str(path)
    return augment.default_augmentation(), "helpers.augment.default_augmentation()"


def main(workdir: str | None = None, n: int = 32, tile: int = 256, batch: int = 8, batches: int = 20,
         steps: int = 6) -> dict:
    """Measure and print the figures; returns them as a dict."""
    os.environ.setdefault("SM_FRAMEWORK", "tf.keras")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import pandas as pd

    from helpers.dataset import make_dataset
    from helpers.losses import make_loss
    from helpers.model import build_model

    tmp = None
    wd = Path(workdir) if workdir else None
    if wd is None or not (wd / "labels" / "manifest.csv").is_file():
        tmp = tempfile.TemporaryDirectory(prefix="bench_pipeline_")
        wd = _synthetic_workdir(Path(tmp.name), n, tile)
    df = pd.read_csv(wd / "labels" / "manifest.csv")
    images = [str(wd / p) for p in df["image"]]
    labels = [str(wd / p) for p in df["label"]]
    aug, aug_name = _augmentation(wd)
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}")
    print(f"tiles: {len(images)} from {wd}; augmentation: {aug_name}; batch {batch}")

    ds = make_dataset(images, labels, batch, True, aug, None, seed=0)
    it = iter(ds)
    next(it)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        x, _ = next(it)
    pipe_s, pipe_cpu = time.perf_counter() - t0, time.process_time() - c0
    tile_px = int(x.shape[1])
    pipe_rate = batches * batch / pipe_s
    print(f"input pipeline alone: {pipe_rate:.1f} tiles/s ({tile_px} px), {1000 * pipe_cpu / (batches * batch):.1f} CPU-ms/tile")

    keras.utils.set_random_seed(0)
    model = build_model(4, encoder_weights=None)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=make_loss(4))
    t0 = time.perf_counter()
    model.fit(ds, epochs=1, steps_per_epoch=1, verbose=0, shuffle=False)
    trace_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    train_rate = steps * batch / train_s
    print(f"training (pipeline feeding the model): {train_rate:.2f} tiles/s, {1000 * train_cpu / (steps * batch):.0f} "
          f"CPU-ms/tile; first step (graph tracing) {trace_s:.0f} s")
    ratio = pipe_rate / train_rate
    verdict = "OK: the pipeline is not the bottleneck" if ratio > 2 else "WARNING: pipeline close to the training speed"
    print(f"pipeline / training throughput: {ratio:.1f}x  ({verdict})")
    if tmp is not None:
        tmp.cleanup()
    return {"pipeline_tiles_per_s": round(pipe_rate, 2), "train_tiles_per_s": round(train_rate, 2),
            "ratio": round(ratio, 2), "pipeline_cpu_ms_per_tile": round(1000 * pipe_cpu / (batches * batch), 1),
            "train_cpu_ms_per_tile": round(1000 * train_cpu / (steps * batch), 1), "trace_s": round(trace_s, 1),
            "tile_px": tile_px, "batch": batch, "machine": machine()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None, help="a work folder with labels/ (default: synthetic tiles)")
    ap.add_argument("--n", type=int, default=32, help="synthetic tiles")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=20, help="batches timed for the pipeline alone")
    ap.add_argument("--steps", type=int, default=6, help="training steps timed")
    a = ap.parse_args()
    main(a.workdir, a.n, a.tile, a.batch, a.batches, a.steps)
