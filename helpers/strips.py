"""Slide reading for whole-slide prediction: each row strip read and stain-normalized once.

With overlapping tiles (07's overlap 4 or 16) consecutive tile bands share rows: a band
``tile`` px high advances by ``stride`` = tile/2 or tile/4, so reading every band as its
own region reads (and normalizes) each pixel 2 or 4 times. :func:`read_bands` cuts the
slide into the strips between band edges, reads and normalizes each strip once over the
columns its bands need, keeps it only while a band still needs it, and builds each
band's tiles from the strips. The stain transform is per pixel (one stain estimate per
slide), so the tiles are the same as when reading bands whole.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np


def _runs(row: list[int], tile: int, max_span: int) -> Iterator[tuple[int, int]]:
    """``(i, j)`` index ranges of a band's tile x positions, each run at most ``max_span`` px wide."""
    i = 0
    while i < len(row):
        j = i
        while j + 1 < len(row) and row[j + 1] + tile - row[i] <= max_span:
            j += 1
        yield i, j
        i = j + 1


def read_bands(slide, ys: list[int], tissue: list[list[int]], tile: int, ds: float,
               norm_fn: Callable[[np.ndarray], np.ndarray] | None, start: int, max_span: int = 4096,
               timings: dict[str, float] | None = None) -> Iterator[tuple[int, int, list[int], np.ndarray, bool]]:
    """Yield ``(band, y, tile x positions, uint8 tiles, last of band)``, one run of tiles at a time.

    Each item is one run (at most ``max_span`` px wide), not a whole band, so what a
    prefetch queue holds does not grow with the slide's width; a band without tissue
    yields one empty item so the consumer still finishes its rows. Seconds spent reading
    and normalizing are added to ``timings["read"]`` and ``timings["normalize"]``.

    Args:
        slide: An open :class:`helpers.slides.Slide`.
        ys: Band tops in raster pixels (sorted).
        tissue: Per band, the x positions of its tiles on tissue.
        tile: Tile side in raster pixels.
        ds: Level-0 pixels per raster pixel.
        norm_fn: Per-slide stain transform, or None.
        start: First band to yield (resuming).
        max_span: Widest run of tiles yielded as one item.
        timings: Optional accumulator of seconds.
    """
    tm = timings if timings is not None else {"read": 0.0, "normalize": 0.0}
    bands = range(start, len(ys))
    edges = sorted({e for b in bands if tissue[b] for e in (ys[b], ys[b] + tile)})
    # columns each strip must cover: the union of the spans of the bands over it
    extent: dict[int, tuple[int, int]] = {}
    for b in bands:
        if tissue[b]:
            lo, hi = tissue[b][0], tissue[b][-1] + tile
            for a in edges:
                if ys[b] <= a < ys[b] + tile:
                    e = extent.get(a, (lo, hi))
                    extent[a] = (min(e[0], lo), max(e[1], hi))
    last_use = {a: max(b for b in bands if tissue[b] and ys[b] <= a < ys[b] + tile) for a in extent}
    nxt = {a: c for a, c in zip(edges, edges[1:])}
    strips: dict[int, tuple[int, np.ndarray]] = {}  # strip top -> (x0, normalized pixels)

    def strip(a: int) -> tuple[int, np.ndarray]:
        if a not in strips:
            x0, x1 = extent[a]
            t0 = time.perf_counter()
            px = slide.read(round(x0 * ds), round(a * ds), x1 - x0, nxt[a] - a, ds)
            t1 = time.perf_counter()
            tm["read"] += t1 - t0
            if norm_fn is not None:
                px = np.asarray(norm_fn(np.array(px)), np.uint8)
                tm["normalize"] += time.perf_counter() - t1
            strips[a] = (x0, px)
        return strips[a]

    for b in bands:
        y, row = ys[b], tissue[b]
        if not row:
            yield b, y, [], np.empty((0, tile, tile, 3), np.uint8), True
            continue
        over = [a for a in edges if y <= a < y + tile]
        for i, j in _runs(row, tile, max_span):
            tiles = np.empty((j + 1 - i, tile, tile, 3), np.uint8)
            for a in over:
                sx0, px = strip(a)
                r0, r1 = a - y, nxt[a] - y
                for k in range(i, j + 1):
                    c = row[k] - sx0
                    tiles[k - i, r0:r1] = px[:, c:c + tile]
            yield b, y, row[i:j + 1], tiles, j + 1 == len(row)
        for a in over:
            if last_use[a] == b:
                strips.pop(a, None)
