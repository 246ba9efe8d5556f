"""Outlines of regions that cross band seams, assembled without holding them whole.

:func:`helpers.qupath.iter_label_features` traces a label image band by band. A region
that crosses band seams (on a slide, often one region spanning the whole slide, with
tens of thousands of holes) is assembled here so that only its *exterior above the
current seam* is held in memory:

* a hole of a band's piece is enclosed within that band, so it is final: it is
  simplified and written at once, as GeoJSON text, to a spool file on disk;
* the pieces' shells (exterior rings) are joined across each seam with
  ``shapely.unary_union`` band by band; the holes this closes lie above the seam, so
  they are final too and go to the spool; only the joined exterior stays in memory;
* when the region is complete its feature is written from the exterior plus the spooled
  holes (:class:`StreamedPolygon`), never built as one geometry.

Validity without the whole geometry: rings traced along pixel edges are valid and meet
only at *pinch corners* (two pixels of the region touching diagonally). Each ring is
simplified on its own (Douglas-Peucker, tolerance below half a label pixel) with its
pinch corners kept as fixed vertices: two rings more than 0 apart are at least one label
pixel apart, each moves by at most the tolerance, so no two rings can cross and each
stays simple. Rings are in label pixels (integers) until written, scaled by the
downsample and rounded to QuPath's coordinate grid.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import numpy as np

#: Largest simplification tolerance (label px) for which independently simplified rings cannot cross.
MAX_RING_TOLERANCE = 0.49


class Spool:
    """Append-only text chunks in an anonymous temporary file (on disk, not in memory)."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self._dir = directory
        self._fh: BinaryIO | None = None
        self._end = 0

    def append(self, text: str) -> tuple[int, int]:
        """Store ``text``; returns ``(offset, length)`` of its UTF-8 bytes."""
        if self._fh is None:
            self._fh = tempfile.TemporaryFile(dir=self._dir, prefix=".outlines.")
        data = text.encode()
        self._fh.seek(self._end)
        self._fh.write(data)
        off, self._end = self._end, self._end + len(data)
        return off, len(data)

    def copy(self, chunks: list[tuple[int, int]], out: TextIO, block: int = 1 << 20) -> None:
        """Write the stored chunks to the text stream ``out``, ``block`` bytes at a time."""
        for off, length in chunks:
            assert self._fh is not None
            self._fh.seek(off)
            while length > 0:
                data = self._fh.read(min(block, length))
                out.write(data.decode())
                length -= len(data)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def pinch_keys(ext: np.ndarray, y0: int) -> np.ndarray:
    """Sorted keys (:func:`corner_keys`) of the lattice corners where ``ext``'s pixels meet only diagonally.

    Args:
        ext: Boolean mask of rows ``y0 - 1 .. y1`` (one row of context either side, False
            beyond the image) of a band covering rows ``y0 .. y1 - 1``.
        y0: The band's first row.
    """
    p = np.pad(ext, ((0, 0), (1, 1)))
    a, b, c, d = p[:-1, :-1], p[:-1, 1:], p[1:, :-1], p[1:, 1:]
    ys, xs = np.nonzero((a == d) & (b == c) & (a != b))
    return np.sort(corner_keys(xs, ys + y0))


def corner_keys(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One int64 per lattice corner ``(x, y)`` (label px)."""
    return (np.asarray(y, np.int64) << 32) | np.asarray(x, np.int64)


def _pinned(coords: np.ndarray, pins: np.ndarray) -> np.ndarray:
    keys = corner_keys(np.rint(coords[:, 0]).astype(np.int64), np.rint(coords[:, 1]).astype(np.int64))
    if not len(pins):
        return np.zeros(len(keys), bool)
    i = np.clip(np.searchsorted(pins, keys), 0, len(pins) - 1)
    return pins[i] == keys


def simplify_rings(rings: list[np.ndarray], pins: np.ndarray, tolerance: float | None) -> list[np.ndarray]:
    """Douglas-Peucker per ring with pinch corners (``pins``, sorted keys) kept; rings closed ``(n, 2)``."""
    import shapely

    if not tolerance or not rings:
        return rings
    runs: list[np.ndarray] = []
    owner: list[int] = []
    for k, ring in enumerate(rings):
        open_ = ring[:-1]
        fixed = np.flatnonzero(_pinned(open_, pins))
        if not len(fixed):  # start at the lowest-left vertex: always a corner of a pixel-edge ring
            fixed = np.array([np.lexsort((open_[:, 0], open_[:, 1]))[0]])
        rolled = np.roll(open_, -fixed[0], axis=0)
        cuts = list(fixed - fixed[0]) + [len(open_)]
        closed = np.vstack([rolled, rolled[:1]])
        for a, b in zip(cuts[:-1], cuts[1:]):
            runs.append(closed[a:b + 1])
            owner.append(k)
    sizes = np.array([len(r) for r in runs])
    lines = shapely.linestrings(np.vstack(runs), indices=np.repeat(np.arange(len(runs)), sizes))
    coords, index = shapely.get_coordinates(shapely.simplify(lines, tolerance, preserve_topology=False),
                                            return_index=True)
    bounds = np.searchsorted(index, np.arange(len(runs) + 1))
    parts: list[list[np.ndarray]] = [[] for _ in rings]
    for j, k in enumerate(owner):
        parts[k].append(coords[bounds[j]:bounds[j + 1] - 1])  # the run's last vertex starts the next run
    return [np.vstack(p + [p[0][:1]]) for p in parts]


def ring_area(coords: np.ndarray) -> float:
    """Unsigned shoelace area of a closed ring."""
    x, y = coords[:, 0], coords[:, 1]
    return abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))) / 2.0


def ring_json(coords: np.ndarray, downsample: float, grid: float) -> str:
    """GeoJSON text of one ring in level-0 px, on QuPath's coordinate ``grid``."""
    decimals = max(0, int(round(-np.log10(grid))))
    return json.dumps(np.round(coords * downsample, decimals).tolist())


@dataclass
class Context:
    """What the pieces of one band share: spool, simplification, scale, this band's pinch corners."""

    spool: Spool
    tolerance: float | None
    downsample: float
    grid: float
    pins: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass
class StreamedPolygon:
    """A region's polygon: exterior in memory, holes as GeoJSON text chunks in a :class:`Spool`."""

    exterior: str
    chunks: list[tuple[int, int]]
    spool: Spool
    area: float  # level-0 px^2, of the simplified rings as written
    holes: int
    vertices: int

    def write(self, out: TextIO) -> None:
        """Write ``{"type": "Polygon", "coordinates": [...]}`` to ``out``."""
        out.write('{"type": "Polygon", "coordinates": [')
        out.write(self.exterior)
        self.spool.copy(self.chunks, out)
        out.write("]}")


class RegionAssembly:
    """One region crossing band seams, being assembled: its joined exterior and its spooled holes."""

    def __init__(self, shell: Any, pins: np.ndarray, key: tuple[int, int], count: int, psum: float,
                 gid: int) -> None:
        self.shell = shell  # shapely Polygon without holes, label px
        self.pins = pins  # sorted pinch keys on the shell
        self.key, self.count, self.psum = key, count, psum
        self.gids = [gid]
        self.chunks: list[tuple[int, int]] = []
        self.hole_area = 0.0
        self.holes = 0
        self.vertices = 0

    @classmethod
    def from_piece(cls, parts: list, key: tuple[int, int], count: int, psum: float, gid: int,
                   ctx: Context) -> RegionAssembly:
        """Start from one band's piece (``[shapely Polygon]`` in label px): its holes go to the spool now."""
        from shapely.geometry import Polygon

        if len(parts) != 1:  # a 4-connected component is traced as one polygon
            raise ValueError(f"a 4-connected piece traced as {len(parts)} polygons")
        poly = parts[0]
        shell = np.asarray(poly.exterior.coords)
        asm = cls(Polygon(shell), ctx.pins[np.isin(ctx.pins, _keys(shell))], key, count, psum, gid)
        asm._spool_holes([np.asarray(r.coords) for r in poly.interiors], ctx.pins, ctx)
        return asm

    def _spool_holes(self, rings: list[np.ndarray], pins: np.ndarray, ctx: Context) -> None:
        if not rings:
            return
        rings = simplify_rings(rings, pins, ctx.tolerance)
        self.hole_area += sum(ring_area(r) for r in rings)
        self.holes += len(rings)
        self.vertices += sum(len(r) for r in rings)
        self.chunks.append(ctx.spool.append("".join(", " + ring_json(r, ctx.downsample, ctx.grid) for r in rings)))

    def absorb(self, others: list[RegionAssembly], ctx: Context) -> None:
        """Join other assemblies (pieces touching across a seam); the holes this closes go to the spool."""
        from shapely import unary_union
        from shapely.geometry import Polygon

        joined = unary_union([self.shell] + [o.shell for o in others])
        if joined.geom_type != "Polygon":  # pieces joined across a seam share an edge: never expected
            raise ValueError(f"pieces of one region joined into a {joined.geom_type}; trace with band_rows=None")
        pins = np.unique(np.concatenate([self.pins] + [o.pins for o in others]))
        for o in others:
            self.key = min(self.key, o.key)
            self.count += o.count
            self.psum += o.psum
            self.gids += o.gids
            self.chunks += o.chunks
            self.hole_area += o.hole_area
            self.holes += o.holes
            self.vertices += o.vertices
        self._spool_holes([np.asarray(r.coords) for r in joined.interiors], pins, ctx)
        self.shell = Polygon(joined.exterior).simplify(0)  # drop the collinear vertices left on seams
        shell = np.asarray(self.shell.exterior.coords)
        self.pins = pins[np.isin(pins, _keys(shell))]

    def finish(self, ctx: Context) -> StreamedPolygon:
        """The complete region's polygon (exterior simplified now, holes already spooled)."""
        ext = simplify_rings([np.asarray(self.shell.exterior.coords)], self.pins, ctx.tolerance)[0]
        area = (ring_area(ext) - self.hole_area) * ctx.downsample ** 2
        return StreamedPolygon(ring_json(ext, ctx.downsample, ctx.grid), self.chunks, ctx.spool, area, self.holes,
                               self.vertices + len(ext))


def _keys(coords: np.ndarray) -> np.ndarray:
    return corner_keys(np.rint(coords[:, 0]).astype(np.int64), np.rint(coords[:, 1]).astype(np.int64))


class HeldRegion:
    """A region held whole until complete and joined with ``unary_union`` (8-connectivity, whose
    pieces may meet at a corner only, and tolerances above :data:`MAX_RING_TOLERANCE`)."""

    def __init__(self, parts: list, key: tuple[int, int], count: int, psum: float, gid: int) -> None:
        self.parts, self.key, self.count, self.psum, self.gids = parts, key, count, psum, [gid]

    @classmethod
    def from_piece(cls, parts: list, key: tuple[int, int], count: int, psum: float, gid: int,
                   ctx: Context) -> HeldRegion:
        return cls(parts, key, count, psum, gid)

    def absorb(self, others: list[HeldRegion], ctx: Context) -> None:
        for o in others:
            self.parts += o.parts
            self.key = min(self.key, o.key)
            self.count += o.count
            self.psum += o.psum
            self.gids += o.gids

    def finish(self, ctx: Context) -> Any:
        """The region as one shapely geometry in level-0 px."""
        return scaled(join(self.parts, len(self.gids) > 1), ctx.downsample)


def join(parts: list, union: bool = False) -> Any:
    """One geometry from a region's polygons: ``unary_union`` when pieces from several bands meet."""
    from shapely import unary_union
    from shapely.geometry import MultiPolygon

    if union:
        return unary_union(parts)
    return parts[0] if len(parts) == 1 else MultiPolygon(parts)


def scaled(geom: Any, downsample: float) -> Any:
    """``geom`` (label px) in level-0 px."""
    import shapely

    return geom if downsample == 1.0 else shapely.transform(geom, lambda c: c * downsample)
