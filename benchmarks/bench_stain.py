"""Stain normalization speed and seams: per-tile staintools vs the per-slide mode.

Run ``python -m benchmarks.bench_stain`` from the repository root. It cuts adjacent
512-px tiles from a real slide (``../shared/data/slides/CMU-1-Small-Region.svs``, level 0),
fits Macenko and Vahadane to a differently stained reference (``stain/breast-pink.png``),
and measures:

* tiles/s of staintools' own ``StainNormalizer.transform`` (re-estimates every tile),
  of our per-tile mode (the same plus the robustness rules) and of the per-slide mode
  (stains estimated once from the slide's tiles, then a fixed least-squares map per tile);
* the colour jump across tile borders: for every shared border, delta E (CIE76) between
  the mean LAB colour of the 4-pixel strips on either side, after normalizing each tile
  on its own; the maximum over the borders (raw tiles give the natural difference, as
  tissue changes across any line);
* the same pixels rendered by two tiles: a tile cut half-way between two neighbours
  overlaps each by 256 px; the mean delta E between its normalized overlap and the
  neighbour's normalized overlap, maximum over the overlaps (0 for raw tiles; any value
  is a seam that tiling alone creates);
* the model's forward pass (``Unet('efficientnetb0', classes=4)``, random weights) on a
  512-px tile, after warm-up, for comparison.

Targets (issue 4): per-slide >= 10x faster than per-tile staintools, and not slower than
the forward pass.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
TILE = 512
XS, YS = (512, 1024, 1536), (1536, 2048)


def _tiles() -> tuple[dict[tuple[int, int], np.ndarray], dict[tuple[int, int], np.ndarray]]:
    """Adjacent tiles, and tiles half-way between horizontal neighbours (overlapping both)."""
    from helpers.slides import open_slide

    with open_slide(SHARED / "slides" / "CMU-1-Small-Region.svs") as s:
        grid = {(x, y): s.read(x, y, TILE, TILE) for y in YS for x in XS}
        mids = {(x + TILE // 2, y): s.read(x + TILE // 2, y, TILE, TILE) for y in YS for x in XS[:-1]}
    return grid, mids


def overlap_disagreement(grid: dict, mids: dict) -> float:
    """Max over overlaps of the mean delta E between two tiles' renderings of the same pixels."""
    from skimage.color import rgb2lab

    h = TILE // 2
    worst = 0.0
    for (mx, y), mid in mids.items():
        left, right = grid[(mx - h, y)], grid[(mx + h, y)]
        for a, b in ((left[:, h:], mid[:, :h]), (right[:, :h], mid[:, h:])):
            worst = max(worst, float(np.linalg.norm(rgb2lab(a) - rgb2lab(b), axis=-1).mean()))
    return worst


def _rate(fn, items, min_items: int = 1) -> tuple[float, list[np.ndarray]]:
    """Tiles per second of ``fn`` over ``items`` and the outputs."""
    t0 = time.perf_counter()
    outs = [fn(it) for it in items[:max(min_items, len(items))]]
    dt = time.perf_counter() - t0
    return len(outs) / dt, outs


def border_jump(tiles: dict[tuple[int, int], np.ndarray], strip: int = 4) -> float:
    """Max over shared borders of delta E between the mean LAB colours of the strips either side."""
    from skimage.color import rgb2lab

    lab = {k: rgb2lab(v) for k, v in tiles.items()}
    jumps = []
    for (x, y), a in lab.items():
        right, below = lab.get((x + TILE, y)), lab.get((x, y + TILE))
        if right is not None:
            jumps.append(np.linalg.norm(a[:, -strip:].reshape(-1, 3).mean(0) - right[:, :strip].reshape(-1, 3).mean(0)))
        if below is not None:
            jumps.append(np.linalg.norm(a[-strip:].reshape(-1, 3).mean(0) - below[:strip].reshape(-1, 3).mean(0)))
    return float(max(jumps))


def forward_pass_rate(n: int = 4) -> float:
    """Tiles/s of the U-Net forward pass on single 512-px tiles (after one warm-up call)."""
    os.environ.setdefault("SM_FRAMEWORK", "tf.keras")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import segmentation_models as sm

    model = sm.Unet("efficientnetb0", classes=4, activation="softmax", encoder_weights=None)
    x = np.random.default_rng(0).random((1, TILE, TILE, 3), dtype=np.float32)
    model.predict(x, verbose=0)
    t0 = time.perf_counter()
    for _ in range(n):
        model.predict(x, verbose=0)
    return n / (time.perf_counter() - t0)


def main() -> dict:
    import logging

    import staintools

    from benchmarks.run_all import print_machine
    from helpers import stain
    from helpers.io import read_image

    logging.getLogger("helpers.stain").setLevel(logging.ERROR)
    print_machine()
    tiles, mids = _tiles()
    mid_keys = sorted(mids)
    keys = sorted(tiles, key=lambda k: (k[1], k[0]))
    items = [tiles[k] for k in keys]
    reference = read_image(SHARED / "stain" / "breast-pink.png")
    print(f"{len(items)} adjacent {TILE}-px tiles ({len(XS)}x{len(YS)}) from CMU-1-Small-Region.svs; "
          "reference breast-pink.png")
    results: dict = {"tile_px": TILE, "tiles": len(items), "border_jump_raw_dE": round(border_jump(tiles), 2),
                     "overlap_dE_raw": round(overlap_disagreement(tiles, mids), 2)}
    print(f"border colour jump, raw tiles: {results['border_jump_raw_dE']:.2f} dE; "
          f"same pixels in two raw tiles: {results['overlap_dE_raw']:.2f} dE")
    for method in ("macenko", "vahadane"):
        norm = stain.fit_normalizer(reference, method)
        st = staintools.StainNormalizer(method)
        st.fit(reference.copy())
        n_slow = len(items) if method == "macenko" else 3
        r_st, _ = _rate(lambda im: st.transform(im.copy()), items[:n_slow])
        r_tile, outs_tile = _rate(norm.transform, items)
        t0 = time.perf_counter()
        slide_fn = norm.for_slide(items)
        estimate_s = time.perf_counter() - t0
        slide_fn(items[0])  # warm caches
        r_slide, outs_slide = _rate(slide_fn, items * 5)
        jump_tile = border_jump(dict(zip(keys, outs_tile)))
        jump_slide = border_jump(dict(zip(keys, outs_slide[:len(items)])))
        ov_tile = overlap_disagreement(dict(zip(keys, outs_tile)), {k: norm.transform(mids[k]) for k in mid_keys})
        ov_slide = overlap_disagreement(dict(zip(keys, outs_slide[:len(items)])), {k: slide_fn(mids[k]) for k in mid_keys})
        results.update({
            f"{method}_staintools_tiles_per_s": round(r_st, 2),
            f"{method}_per_tile_tiles_per_s": round(r_tile, 2),
            f"{method}_per_slide_tiles_per_s": round(r_slide, 1),
            f"{method}_per_slide_estimate_s": round(estimate_s, 2),
            f"{method}_speedup_vs_staintools": round(r_slide / r_st, 1),
            f"{method}_border_jump_per_tile_dE": round(jump_tile, 2),
            f"{method}_border_jump_per_slide_dE": round(jump_slide, 2),
            f"{method}_overlap_dE_per_tile": round(ov_tile, 2),
            f"{method}_overlap_dE_per_slide": round(ov_slide, 2),
        })
        print(f"{method:>8}: staintools per tile {r_st:6.2f} tiles/s | ours per tile {r_tile:6.2f} tiles/s | "
              f"per slide {r_slide:6.1f} tiles/s (+ {estimate_s:.2f} s once per slide) -> "
              f"{r_slide / r_st:.0f}x faster than staintools")
        print(f"{'':>8}  border colour jump: per tile {jump_tile:.2f} dE, per slide {jump_slide:.2f} dE "
              f"(raw {results['border_jump_raw_dE']:.2f} dE); same pixels in two tiles: per tile {ov_tile:.2f} dE, "
              f"per slide {ov_slide:.2f} dE")
    fwd = forward_pass_rate()
    results["forward_pass_tiles_per_s"] = round(fwd, 2)
    for method in ("macenko", "vahadane"):
        results[f"{method}_per_slide_vs_forward"] = round(results[f"{method}_per_slide_tiles_per_s"] / fwd, 1)
    print(f"U-Net efficientnetb0 forward pass: {fwd:.2f} tiles/s "
          f"(per-slide Macenko is {results['macenko_per_slide_vs_forward']:.0f}x, Vahadane "
          f"{results['vahadane_per_slide_vs_forward']:.0f}x as fast)")
    ok = all(results[f"{m}_speedup_vs_staintools"] >= 10 and results[f"{m}_per_slide_vs_forward"] >= 1
             for m in ("macenko", "vahadane"))
    results["targets_met"] = ok
    print(f"targets (>= 10x staintools, not slower than the forward pass): {'met' if ok else 'NOT met'}")
    return results


if __name__ == "__main__":
    main()
