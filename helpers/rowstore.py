"""Whole-slide rasters built and read by rows, never held whole (prediction and export).

:class:`RowStore` is a ``.npy`` file written and read by rows (and a tile source for
:func:`helpers.rasters.write_pyramid_tiff`), :class:`RasterRows` reads rows of a written
TIFF on demand, and :func:`write_raster` writes either atomically, a full disk becoming a
one-line :class:`helpers.errors.DiskFullError` (through :func:`helpers.io.write_guard`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from helpers.errors import HistoUNetError
from helpers.io import atomic_path, write_guard
from helpers.rasters import raster_info, read_raster, write_pyramid_tiff

@contextlib.contextmanager
def disk_full_guard(path: Path) -> Iterator[None]:
    """The shared write guard (:func:`helpers.io.write_guard`) for a file: names its folder."""
    with write_guard(Path(path).parent):
        yield


def write_raster(path: Path, array: "np.ndarray | RowStore", *, kind: str, mpp: float, downsample: float, meta: dict,
                 overwrite: bool) -> Path:
    """Write a pyramidal TIFF atomically (nothing under the final name unless complete).

    ``array`` is an in-memory array or a :class:`RowStore`, which the writer reads strip by
    strip (bounded memory).
    """
    h, w = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    with disk_full_guard(path), atomic_path(path, overwrite) as tmp:
        write_pyramid_tiff(tmp, array, width=w, height=h, channels=channels, dtype=array.dtype, kind=kind,
                           mpp=mpp, downsample=downsample, meta=meta, overwrite=True, progress=False)
    return path


class RowStore:
    """A ``(H, W, C)`` array in a ``.npy`` file, read and written by rows with plain file I/O.

    Unlike a memory map, rows written or read here live in the OS page cache, not in this
    process's resident memory, so a whole-slide raster costs RSS only for the rows in use.
    It is also a tile source for :func:`helpers.rasters.write_pyramid_tiff`: calling it as
    ``store(x, y, w, h)`` returns that region (a strip of rows is cached, since the writer
    asks for row-major strips), and it supports ``store[y0:y1]`` / ``store[y0:y1, x0:x1, c]``
    slicing with a row slice first.
    """

    def __init__(self, path: str | Path, shape: tuple[int, ...] | None = None, dtype: Any = np.uint8,
                 create: bool = False) -> None:
        self.path = Path(path)
        if create:
            mm = np.lib.format.open_memmap(self.path, mode="w+", dtype=dtype, shape=tuple(shape or ()))
            del mm  # header written, file sized (sparse); no page touched
        mm = np.load(self.path, mmap_mode="r")
        self.shape: tuple[int, ...] = tuple(mm.shape)
        self.dtype = mm.dtype
        self.offset = int(mm.offset)
        del mm
        self.ndim = len(self.shape)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        # unbuffered, and read / written at explicit offsets (pread / pwrite): no shared file position, so
        # threads may read one store at once (07's export writes labels.tiff while it traces the GeoJSON;
        # seek + read on one handle from two threads mixed rows up)
        self._fh = open(self.path, "r+b", buffering=0)  # noqa: SIM115 - closed by close()
        self._strip: tuple[int, int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def write(self, y: int, rows: np.ndarray) -> None:
        """Store ``rows`` from row ``y`` on."""
        rows = np.ascontiguousarray(rows, self.dtype)
        if rows.shape[1:] != self.shape[1:] or y < 0 or y + len(rows) > self.shape[0]:
            raise ValueError(f"{self.path}: rows {rows.shape} at y={y} do not fit {self.shape}")
        self._strip = None
        view, pos = memoryview(rows).cast("B"), self.offset + y * self.row_bytes
        while len(view):
            n = os.pwrite(self._fh.fileno(), view, pos)
            view, pos = view[n:], pos + n

    def read(self, y0: int, y1: int) -> np.ndarray:
        """Rows ``[y0, y1)`` (clipped to the array) as a new array."""
        y0, y1 = max(0, int(y0)), min(self.shape[0], int(y1))
        out = np.empty((max(0, y1 - y0), *self.shape[1:]), self.dtype)
        if out.size:
            view, pos = memoryview(out).cast("B"), self.offset + y0 * self.row_bytes
            while len(view):
                n = os.preadv(self._fh.fileno(), [view], pos)
                if n <= 0:
                    raise HistoUNetError(f"{self.path}: file is shorter than its header says; delete it and run again")
                view, pos = view[n:], pos + n
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, (int, np.integer)):
            return self.read(int(key), int(key) + 1)[0][rest] if rest else self.read(int(key), int(key) + 1)[0]
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("RowStore supports a contiguous row slice (optionally followed by column/channel keys)")
        y0, y1, _ = key.indices(self.shape[0])
        rows = self.read(y0, y1)
        return rows[(slice(None), *rest)] if rest else rows

    def __setitem__(self, key: Any, rows: np.ndarray) -> None:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("RowStore assignment takes a contiguous row slice")
        y0, y1, _ = key.indices(self.shape[0])
        rows = np.asarray(rows)
        if len(rows) != y1 - y0:
            raise ValueError(f"{self.path}: {len(rows)} rows assigned to rows {y0}-{y1}")
        self.write(y0, rows)

    def __call__(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        strip = self._strip  # one local reference: another thread may replace the cached strip meanwhile
        if strip is None or strip[:2] != (y, h):
            strip = self._strip = (y, h, self.read(y, y + h))
        return strip[2][:, x:x + w]

    def flush(self) -> None:
        """Push written rows to the OS (they already are: writes are unbuffered)."""
        self._fh.flush()

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._strip = None
        self._fh.close()


class RasterRows:
    """Rows of a raster TIFF at its own resolution, read on demand (``rows[y0:y1]``,
    ``rows[y0:y1, x0:x1, c]``): a whole-slide probability map used band by band."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        info = raster_info(self.path)
        self.downsample = float(info["downsample"])
        self.shape: tuple[int, ...] = (info["height"], info["width"]) + ((info["channels"],) if info["channels"] > 1 else ())
        self.dtype = np.dtype(info["dtype"])
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, y0: int, y1: int) -> np.ndarray:
        """Rows ``[y0, y1)`` (clipped)."""
        y0, y1 = max(0, int(y0)), min(self.shape[0], int(y1))
        if y1 <= y0:
            return np.empty((0, *self.shape[1:]), self.dtype)
        d = self.downsample
        out = np.asarray(read_raster(self.path, downsample=d, region=(0.0, y0 * d, self.shape[1] * d, (y1 - y0) * d)))
        if out.shape[:2] != (y1 - y0, self.shape[1]):
            raise HistoUNetError(f"{self.path}: read rows {y0}-{y1} as {out.shape}; the raster is damaged, "
                                 "run predict_slide again")
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("RasterRows supports a contiguous row slice (optionally followed by column/channel keys)")
        y0, y1, _ = key.indices(self.shape[0])
        rows = self.read(y0, y1)
        return rows[(slice(None), *rest)] if rest else rows
