"""Blending tile predictions into a rolling band of rows, and handing finished rows on.

:func:`helpers.predict.predict_slide` walks the slide in bands of tiles, top to bottom.
Overlapping tiles are summed (with blending weights) into a buffer of ``tile`` rows
starting at the first unfinished row (``top``); rows that no pending or future tile can
reach any more are finished: divided by the summed weights, turned into uint8 and written,
and the buffer moves down.

Tiles wait for a full model batch across band ends: without that every band's last,
partial batch was padded with glass (at overlap 16 on a 4096^2 slide, 108 model calls
for 769 tiles: 11 % of the model's work spent on padding). A batch that holds a band's
last tiles and the next band's first ones gives probabilities below the buffer; those
few tiles (fewer than a batch) are kept aside until the buffer reaches them
(:meth:`BandAccumulator.advance`). Before, the buffer was one band taller instead,
a band of float32 rows the full raster wide: peak memory then grew with the slide's
width (P3 of issue 17: 1.44-1.51x from a 10k^2 to a 40k^2 slide).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def finalize_rows(acc: np.ndarray, wsum: np.ndarray, bg: int, chunk_rows: int = 16) -> np.ndarray:
    """Blended probabilities -> uint8 0-255 (``rint(acc / wsum * 255)``); pixels no tile covered are background.

    Works ``chunk_rows`` rows at a time, so its float temporaries are a few rows, not the band.
    One division per pixel (``255 / wsum``), not per channel, and the uncovered pixels are
    set only where there are any (inside tissue there are none).
    """
    out = np.empty(acc.shape, np.uint8)
    for r in range(0, acc.shape[0], chunk_rows):
        a, w = acc[r:r + chunk_rows], wsum[r:r + chunk_rows]
        covered = w > 0
        scale = np.divide(np.float32(255.0), w, out=np.zeros(w.shape, np.float32), where=covered)
        q = a * scale[..., None]
        np.rint(q, out=q)
        np.clip(q, 0.0, 255.0, out=q)
        o = out[r:r + chunk_rows]
        np.copyto(o, q, casting="unsafe")
        if not covered.all():
            o[~covered] = 0
            o[~covered, bg] = 255
    return out


def shift_rows(buf: np.ndarray, done: int, chunk_rows: int = 64) -> None:
    """Move rows ``done:`` of a band buffer to the top and zero the rest, in place (no band-sized copy)."""
    n = buf.shape[0]
    if done >= n:
        buf[:] = 0
        return
    step = max(1, min(chunk_rows, done))  # destination chunks never overlap their source
    for r in range(0, n - done, step):
        e = min(r + step, n - done)
        buf[r:e] = buf[done + r:done + e]
    buf[n - done:] = 0


class BandAccumulator:
    """Weighted sums of tile probabilities over rows ``[top, top + rows)`` of a raster ``width`` wide.

    Args:
        width: Raster width in pixels.
        n_cls: Classes (channels) per pixel.
        tile: Tile side in pixels.
        weights: ``(tile, tile)`` blending weights.
        rows: Buffer height; at least ``tile`` (``tile`` is enough: tiles below the buffer wait
            aside, see :meth:`advance`).
        top: Raster row of the buffer's first row.
        acc, wsum: Buffers of an interrupted run (resuming), else zeros.
    """

    def __init__(self, width: int, n_cls: int, tile: int, weights: np.ndarray, rows: int, top: int = 0,
                 acc: np.ndarray | None = None, wsum: np.ndarray | None = None) -> None:
        if rows < tile:
            raise ValueError(f"rows={rows} must be at least the tile ({tile})")
        self.tile, self.weights, self.top = tile, weights, top
        self.acc = acc if acc is not None else np.zeros((rows, width, n_cls), np.float32)
        self.wsum = wsum if wsum is not None else np.zeros((rows, width), np.float32)
        self.waiting: list[tuple[int, int, np.ndarray]] = []  # tiles below the buffer, until it reaches them

    @property
    def rows(self) -> int:
        """Buffer height in rows."""
        return int(self.acc.shape[0])

    def fits(self, y: int) -> bool:
        """Whether a tile whose top is raster row ``y`` lies inside the buffer."""
        return self.top <= y and y + self.tile <= self.top + self.rows

    def add(self, y: int, x: int, probs: np.ndarray) -> None:
        """Add one tile's probabilities (``(tile, tile, n_cls)``, scaled in place by the weights).

        A tile below the buffer is copied and waits until :meth:`advance` reaches it; a tile
        above the buffer (rows already finished) is an error.
        """
        if y < self.top:
            raise ValueError(f"tile at row {y} is above the first unfinished row {self.top}")
        if not self.fits(y):
            self.waiting.append((y, x, np.array(probs, np.float32)))
            return
        r = y - self.top
        probs *= self.weights[..., None]
        self.acc[r:r + self.tile, x:x + self.tile] += probs
        self.wsum[r:r + self.tile, x:x + self.tile] += self.weights

    def finish(self, until: int, bg: int) -> tuple[int, np.ndarray]:
        """Finish rows ``[top, until)``: ``(their first row, uint8 probabilities)``; the buffer moves down."""
        done = max(0, min(until, self.top + self.rows) - self.top)
        start = self.top
        out = finalize_rows(self.acc[:done], self.wsum[:done], bg)
        shift_rows(self.acc, done)
        shift_rows(self.wsum, done)
        self.top += done
        return start, out

    def advance(self, until: int, bg: int, write: Callable[[int, np.ndarray], None]) -> None:
        """Finish every row above ``until`` and above the waiting tiles, block by block.

        Each finished block goes to ``write(first row, uint8 probabilities)``; waiting tiles
        join the buffer as soon as it reaches them. Called with ``until`` = the first row a tile
        not yet added could touch, nothing is left waiting afterwards.
        """
        while True:
            bound = min([until] + [y for y, _, _ in self.waiting])
            if bound <= self.top:
                return
            row0, rows = self.finish(bound, bg)
            if len(rows):
                write(row0, rows)
            waiting, self.waiting = self.waiting, []
            for y, x, p in waiting:
                self.add(y, x, p)
