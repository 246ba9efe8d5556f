"""Pyramidal tiled TIFF rasters: slides, truth labels, predictions and probabilities.

:func:`write_pyramid_tiff` writes a raster tile by tile, from a numpy array (a memmap
is fine) or from a callable ``read_tile(x, y, w, h)``, so memory is bounded by a few
tiles, not by the image size. The pyramid is level 0 plus successive halvings until
the image fits in one tile, each level a separate top-level TIFF directory (the layout
OpenSlide reads as a "generic tiled TIFF"). Lower levels are reduced from the level
above, tile by tile: area averaging for RGB and probabilities, a 2x2 majority vote for
labels (so a label pyramid never contains a value that level 0 does not have).

Level 0's ImageDescription holds JSON::

    {"histo_unet": {"downsample": d, "mpp": m, "kind": "rgb" | "labels" | "probabilities", ...}}

where ``d`` is level-0 *slide* pixels per raster pixel and ``m`` microns per raster
pixel (also stored as XResolution/YResolution in pixels per centimetre, which is what
OpenSlide reports as ``openslide.mpp-x``).

:func:`read_raster` reads such a raster back at any *slide* downsample and region.

Rasters too large to hold are built and read by rows with :mod:`helpers.rowstore`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from helpers.cohort import cpu_count
from helpers.errors import ParameterError, RasterError
from helpers.io import atomic_path, check_writable

log = logging.getLogger(__name__)

#: Kinds of raster and how their lower levels are reduced.
KINDS = ("rgb", "labels", "probabilities")
#: Lower-level buffers larger than this go to a memory-mapped temporary file.
_RAM_BUFFER_BYTES = 64 * 2**20
#: Width (in tiles) of the regions requested from a callable source at once.
_BLOCK_TILES = 8

TileReader = Callable[[int, int, int, int], np.ndarray]


def pyramid_shapes(width: int, height: int, tile: int = 256) -> list[tuple[int, int]]:
    """(width, height) of each pyramid level: halve (rounding up) until one tile holds it."""
    shapes = [(int(width), int(height))]
    while max(shapes[-1]) > tile:
        w, h = shapes[-1]
        shapes.append(((w + 1) // 2, (h + 1) // 2))
    return shapes


def source_regions(width: int, height: int, tile: int = 256) -> list[tuple[int, int, int, int]]:
    """The level-0 regions ``(x, y, w, h)`` that :func:`write_pyramid_tiff` asks a callable
    source for, in the order it asks (row-major strips ``tile`` high, at most
    ``8 * tile`` wide). A source may use it to compute regions ahead, e.g. in threads."""
    block = tile * _BLOCK_TILES
    return [(bx, y, min(block, width - bx), min(tile, height - y))
            for y in range(0, height, tile) for bx in range(0, width, block)]


def _reduce2(block: np.ndarray, kind: str) -> np.ndarray:
    """Halve a (h, w, c) block: area mean, or 2x2 majority vote for labels."""
    h, w = block.shape[:2]
    if h % 2 or w % 2:
        block = np.pad(block, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    if kind == "labels":
        a, b = block[0::2, 0::2], block[0::2, 1::2]
        c, d = block[1::2, 0::2], block[1::2, 1::2]
        # most 2x2 blocks of a label image are one class: vote only where they are not (4x faster)
        mixed = (a != b) | (a != c) | (a != d)
        if not mixed.all():
            out = a.copy()
            if mixed.any():
                out[mixed] = _vote(a[mixed], b[mixed], c[mixed], d[mixed])
            return out
        return _vote(a, b, c, d)
    if block.dtype.kind == "u" and block.dtype.itemsize <= 2:
        # integer sums, rounded half to even exactly as np.rint of the float mean (3x faster)
        wide = np.uint16 if block.dtype.itemsize == 1 else np.uint32
        s = block[0::2, 0::2].astype(wide)
        s += block[0::2, 1::2]
        s += block[1::2, 0::2]
        s += block[1::2, 1::2]
        q, r = s >> 2, s & 3
        q += (r > 2) | ((r == 2) & (q & 1).astype(bool))
        return q.astype(block.dtype)
    hh, ww, cc = block.shape
    mean = block.reshape(hh // 2, 2, ww // 2, 2, cc).mean(axis=(1, 3), dtype=np.float32)
    if np.issubdtype(block.dtype, np.integer):
        return np.rint(mean).astype(block.dtype)
    return mean.astype(block.dtype)


def _vote(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """2x2 majority vote of four equal-shape arrays; ties go to the earlier one (top-left first)."""
    votes = np.stack([
        (a == b).astype(np.uint8) + (a == c) + (a == d),
        (b == a).astype(np.uint8) + (b == c) + (b == d),
        (c == a).astype(np.uint8) + (c == b) + (c == d),
        (d == a).astype(np.uint8) + (d == b) + (d == c),
    ])
    return np.choose(np.argmax(votes, axis=0), [a, b, c, d])


def _as_hwc(a: np.ndarray) -> np.ndarray:
    return a[..., None] if a.ndim == 2 else a


def _level_buffer(shape: tuple[int, ...], dtype: np.dtype, tmpdir: Path, name: str) -> np.ndarray:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes <= _RAM_BUFFER_BYTES:
        return np.zeros(shape, dtype)
    return np.lib.format.open_memmap(tmpdir / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)


def write_pyramid_tiff(
    path: str | Path,
    source: np.ndarray | TileReader,
    *,
    width: int | None = None,
    height: int | None = None,
    channels: int = 3,
    dtype: Any = np.uint8,
    kind: str = "rgb",
    tile: int = 256,
    compression: str | None = None,
    quality: int = 90,
    mpp: float | None = None,
    downsample: float = 1.0,
    meta: dict | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write a pyramidal, tiled TIFF atomically, holding only a few tiles in memory.

    Args:
        path: Output ``.tiff`` file.
        source: The level-0 raster as an array ``(H, W)`` or ``(H, W, C)`` (a memmap is
            fine), or a callable ``read_tile(x, y, w, h) -> array (h, w[, C])`` returning
            that region of level 0. It is called with row-major regions at most
            ``8 * tile`` wide and ``tile`` high, each once.
        width, height: Raster size; required for a callable source.
        channels: Channels per pixel of a callable source (3 for RGB, 1 for labels).
        dtype: Pixel type of a callable source.
        kind: ``"rgb"`` (uint8, 3 channels; JPEG, opens in OpenSlide/QuPath),
            ``"labels"`` (one integer channel; reduced by majority vote) or
            ``"probabilities"`` (any channels; reduced by area averaging).
        tile: Tile size in pixels (a multiple of 16).
        compression: ``"jpeg"`` (default for rgb), ``"zlib"`` (default otherwise) or ``"none"``.
        quality: JPEG quality 1-100.
        mpp: Microns per *raster* pixel at level 0 (slide mpp x ``downsample``); stored
            as the TIFF resolution so OpenSlide reports ``openslide.mpp-x``.
        downsample: Level-0 slide pixels per raster pixel (1 for a slide or full-resolution truth).
        meta: Extra JSON-able values stored in the ``histo_unet`` description.
        overwrite: Replace an existing file.
        progress: Show a tqdm progress bar over tiles.

    Returns:
        The path written.

    Raises:
        OutputExistsError: the file exists and ``overwrite`` is False.
        ParameterError: inconsistent sizes, kind, channels or compression.
    """
    import tifffile
    from tqdm.auto import tqdm

    path = Path(path)
    if kind not in KINDS:
        raise ParameterError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if tile <= 0 or tile % 16:
        raise ParameterError(f"tile must be a positive multiple of 16; got {tile}")
    if callable(source) and not isinstance(source, np.ndarray):
        if width is None or height is None:
            raise ParameterError(f"{path}: width and height are required with a callable source")
        width, height, channels, dtype = int(width), int(height), int(channels), np.dtype(dtype)
        array = None
    else:
        array = np.asanyarray(source)
        if array.ndim not in (2, 3):
            raise ParameterError(f"{path}: source array must be (H, W) or (H, W, C); got shape {array.shape}")
        h0, w0 = array.shape[:2]
        if (width is not None and width != w0) or (height is not None and height != h0):
            raise ParameterError(f"{path}: width/height {width}x{height} differ from the array's {w0}x{h0}")
        width, height = w0, h0
        channels = 1 if array.ndim == 2 else array.shape[2]
        dtype = array.dtype
    if width < 1 or height < 1:
        raise ParameterError(f"{path}: raster size must be positive; got {width}x{height}")
    if kind == "rgb" and (channels != 3 or dtype != np.uint8):
        raise ParameterError(f"{path}: kind 'rgb' needs 3 uint8 channels; got {channels} x {dtype}")
    if kind == "labels" and (channels != 1 or not np.issubdtype(dtype, np.integer)):
        raise ParameterError(f"{path}: kind 'labels' needs one integer channel; got {channels} x {dtype}")
    compression = (compression or ("jpeg" if kind == "rgb" else "zlib")).lower()
    if compression not in ("jpeg", "zlib", "none"):
        raise ParameterError(f"compression must be 'jpeg', 'zlib' or 'none'; got {compression!r}")
    if compression == "jpeg" and (dtype != np.uint8 or channels not in (1, 3) or kind == "labels"):
        raise ParameterError(f"{path}: JPEG is lossy and for uint8 images only; use compression='zlib' for {kind}")
    if mpp is not None and not mpp > 0:
        raise ParameterError(f"mpp must be > 0; got {mpp}")
    if not downsample > 0:
        raise ParameterError(f"downsample must be > 0; got {downsample}")
    check_writable(path, overwrite)

    shapes = pyramid_shapes(width, height, tile)
    n_tiles = sum(math.ceil(w / tile) * math.ceil(h / tile) for w, h in shapes)
    info = {"downsample": float(downsample), "mpp": None if mpp is None else float(mpp), "kind": kind,
            "width": width, "height": height, "channels": channels, "levels": len(shapes)}
    info.update(meta or {})
    description = json.dumps({"histo_unet": info})
    raw_bytes = sum(w * h for w, h in shapes) * channels * np.dtype(dtype).itemsize
    photometric = "rgb" if kind == "rgb" else "minisblack"
    codec: dict[str, Any] = {"compression": None if compression == "none" else compression}
    if compression == "jpeg":
        codec["compressionargs"] = {"level": int(quality)}
    elif compression == "zlib":
        # level 1: 3x faster than 6 for ~10 % more bytes (2048^2 x 4 probabilities: 0.058 vs 0.165 CPU-s,
        # 2.9 vs 2.7 MB); the pyramid is written on the slide's critical path (benchmarks/bench_inference.py)
        codec["compressionargs"] = {"level": 1}
        codec["predictor"] = np.issubdtype(dtype, np.integer) and kind != "labels"
    bar = tqdm(total=n_tiles, desc=f"writing {path.name}", unit="tile", disable=not progress, leave=False)

    def padded(t: np.ndarray) -> np.ndarray:
        t = _as_hwc(np.asarray(t))
        if t.shape[0] < tile or t.shape[1] < tile:
            t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1]), (0, 0)), mode="edge")
        return t if channels > 1 else t[..., 0]

    def level0_regions() -> Iterator[tuple[int, int, np.ndarray]]:
        """Level-0 tiles in row-major order, as (x, y, tile array)."""
        for bx, y, bw, th in source_regions(width, height, tile):
            if array is not None:
                region = array[y:y + th, bx:bx + bw]
            else:
                region = source(bx, y, bw, th)  # type: ignore[operator]
            region = _as_hwc(np.asarray(region))
            if region.shape[:2] != (th, bw) or region.shape[2] != channels:
                raise ParameterError(
                    f"{path}: read_tile({bx}, {y}, {bw}, {th}) returned shape {region.shape}; "
                    f"expected ({th}, {bw}, {channels})")
            region = region.astype(dtype, copy=False)
            for x in range(bx, bx + bw, tile):
                yield x, y, region[:, x - bx:x - bx + tile]

    def level_regions(buf: np.ndarray, w: int, h: int) -> Iterator[tuple[int, int, np.ndarray]]:
        for y in range(0, h, tile):
            for x in range(0, w, tile):
                yield x, y, np.asarray(buf[y:y + tile, x:x + tile])

    def tiles(regions: Iterator[tuple[int, int, np.ndarray]], nxt: np.ndarray | None) -> Iterator[np.ndarray]:
        for x, y, t in regions:
            if nxt is not None:
                r = _reduce2(t, kind)
                nxt[y // 2:y // 2 + r.shape[0], x // 2:x // 2 + r.shape[1]] = r
            bar.update(1)
            yield padded(t)

    try:
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(atomic_path(path, overwrite))
            tmpdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f".{path.stem}.", dir=path.parent)))
            tw = stack.enter_context(tifffile.TiffWriter(tmp, bigtiff=raw_bytes > 2**32 - 2**27))
            regions: Iterator[tuple[int, int, np.ndarray]] = level0_regions()
            for level, (lw, lh) in enumerate(shapes):
                nxt = None
                if level + 1 < len(shapes):
                    nw, nh = shapes[level + 1]
                    nxt = _level_buffer((nh, nw, channels), np.dtype(dtype), tmpdir, f"level{level + 1}")
                extra: dict[str, Any] = {}
                if mpp is not None:
                    res = 1e4 / (mpp * width / lw)  # pixels per centimetre at this level
                    extra = {"resolution": (res, res), "resolutionunit": "CENTIMETER"}
                tw.write(
                    tiles(regions, nxt),
                    shape=(lh, lw, channels) if channels > 1 else (lh, lw),
                    dtype=dtype,
                    tile=(tile, tile),
                    photometric=photometric,
                    planarconfig="contig" if channels > 1 else None,
                    description=description if level == 0 else None,
                    subfiletype=0 if level == 0 else 1,  # OpenSlide needs REDUCEDIMAGE on lower levels
                    metadata=None,
                    software="histo-unet",
                    maxworkers=cpu_count(),  # tifffile's default is half the cores: 1 of 2, while the other waits
                    **codec,
                    **extra,
                )
                if nxt is not None:
                    regions = level_regions(nxt, *shapes[level + 1])
    finally:
        bar.close()
    log.info("wrote %s (%dx%d, %d levels, %s)", path, width, height, len(shapes), kind)
    return path


def _open_tiff(path: Path):
    import tifffile

    if not path.is_file():
        raise RasterError(f"{path}: raster not found; run the step that writes it first")
    try:
        tif = tifffile.TiffFile(path)
        if not tif.pages or not tif.pages[0].is_tiled:
            tif.close()
            raise RasterError(f"{path}: not a tiled TIFF raster; rewrite it with helpers.rasters.write_pyramid_tiff")
    except RasterError:
        raise
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types for damaged files
        raise RasterError(f"{path}: cannot read the TIFF ({exc}); the file is damaged, write it again") from None
    return tif


def _levels(tif) -> list:
    """Pages forming the pyramid: level 0 and the reduced-resolution pages after it."""
    pages = [tif.pages[0]]
    for page in tif.pages[1:]:
        if page.is_tiled and page.shape[2:] == pages[0].shape[2:] and page.shape[0] < pages[-1].shape[0]:
            pages.append(page)
    return pages


def raster_info(path: str | Path) -> dict:
    """Geometry and metadata of a raster TIFF.

    Returns:
        ``{"width", "height", "channels", "dtype", "levels": [(w, h), ...], "downsample",
        "mpp", "kind", "meta"}`` where ``downsample`` is slide pixels per raster pixel,
        ``mpp`` microns per raster pixel (None if unknown) and ``meta`` the whole
        ``histo_unet`` description (empty for foreign TIFFs).

    Raises:
        RasterError: missing or unreadable file.
    """
    path = Path(path)
    tif = _open_tiff(path)
    try:
        levels = _levels(tif)
        page = levels[0]
        meta: dict = {}
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            meta = json.loads(page.description or "{}").get("histo_unet", {}) or {}
        mpp = meta.get("mpp")
        if mpp is None:
            with contextlib.suppress(KeyError, TypeError, ZeroDivisionError):
                num, den = page.tags["XResolution"].value
                if page.tags["ResolutionUnit"].value == 3 and num:
                    mpp = 1e4 * den / num
        channels = page.shape[2] if len(page.shape) == 3 else 1
        kind = meta.get("kind") or ("rgb" if channels == 3 and page.dtype == np.uint8 else "probabilities")
        return {
            "width": int(page.shape[1]),
            "height": int(page.shape[0]),
            "channels": int(channels),
            "dtype": str(page.dtype),
            "levels": [(int(p.shape[1]), int(p.shape[0])) for p in levels],
            "downsample": float(meta.get("downsample", 1.0)),
            "mpp": None if mpp is None else float(mpp),
            "kind": kind,
            "meta": meta,
        }
    finally:
        tif.close()


def _read_page_region(tif, page, x0: int, y0: int, x1: int, y1: int, fill: float) -> np.ndarray:
    """Pixels [y0:y1, x0:x1] of a tiled page (coordinates may exceed it: filled with ``fill``)."""
    h, w = page.shape[:2]
    channels = page.shape[2] if len(page.shape) == 3 else 1
    out = np.full((y1 - y0, x1 - x0, channels), fill, dtype=page.dtype)
    th, tw = page.tilelength, page.tilewidth
    across = math.ceil(w / tw)
    jpegtables = page.jpegtables
    rows = range(max(0, y0) // th, (min(h, y1) - 1) // th + 1) if y1 > 0 and y0 < h else range(0)
    cols = range(max(0, x0) // tw, (min(w, x1) - 1) // tw + 1) if x1 > 0 and x0 < w else range(0)
    # A plain handle of our own: tifffile reads tags lazily through its shared one.
    jobs = []
    with open(tif.filehandle.path, "rb") as fh:
        for ty in rows:
            for tx in cols:
                index = ty * across + tx
                offset, count = page.dataoffsets[index], page.databytecounts[index]
                if count:
                    fh.seek(offset)
                    jobs.append((index, tx, ty, fh.read(count)))

    def decode(job: tuple[int, int, int, bytes]) -> tuple[int, int, np.ndarray]:
        index, tx, ty, data = job
        segment, _, _ = page.decode(data, index, jpegtables=jpegtables)
        return tx, ty, segment.reshape(th, tw, channels)

    workers = min(cpu_count(), len(jobs))
    if workers > 1:  # zlib and JPEG decoding release the GIL: one thread per core
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            decoded = list(pool.map(decode, jobs))
    else:
        decoded = [decode(j) for j in jobs]
    for tx, ty, segment in decoded:
        # Overlap of this tile with the requested window, clipped to the page.
        gx0, gy0 = max(x0, tx * tw), max(y0, ty * th)
        gx1, gy1 = min(x1, (tx + 1) * tw, w), min(y1, (ty + 1) * th, h)
        out[gy0 - y0:gy1 - y0, gx0 - x0:gx1 - x0] = \
            segment[gy0 - ty * th:gy1 - ty * th, gx0 - tx * tw:gx1 - tx * tw]
    return out


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area (shrink) or linear (enlarge) resize of (h, w, c) to size = (width, height); any channel count."""
    import cv2

    w, h = size
    if img.shape[1] == w and img.shape[0] == h:
        return img
    interp = cv2.INTER_AREA if img.shape[1] > w else cv2.INTER_LINEAR
    work = img if img.dtype != np.float16 else img.astype(np.float32)
    parts = []
    for c in range(0, work.shape[2], 4):
        part = cv2.resize(np.ascontiguousarray(work[..., c:c + 4]), (w, h), interpolation=interp)
        parts.append(part.reshape(h, w, -1))
    return np.concatenate(parts, axis=2).astype(img.dtype, copy=False)


def read_raster(path: str | Path, downsample: float | None = None,
                region: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Read a raster at a *slide* downsample, optionally a region of it.

    Args:
        path: A raster written by :func:`write_pyramid_tiff` (or any tiled TIFF).
        downsample: Slide level-0 pixels per output pixel; None = the raster's own
            resolution (its ``downsample``).
        region: ``(x, y, w, h)`` in slide level-0 pixels; None = the whole raster.
            Parts outside the raster are 0 (white for rgb).

    Returns:
        ``(h, w)`` for single-channel rasters, else ``(h, w, C)``; output size is
        ``round(w / downsample) x round(h / downsample)``. Labels are resized by
        nearest neighbour, other kinds by area averaging (linear when enlarging).

    Raises:
        RasterError: missing or damaged file.
        ParameterError: non-positive downsample or empty region.
    """
    path = Path(path)
    info = raster_info(path)
    d = info["downsample"]
    ds = d if downsample is None else float(downsample)
    if not ds > 0:
        raise ParameterError(f"downsample must be > 0; got {downsample}")
    if region is None:
        region = (0.0, 0.0, info["width"] * d, info["height"] * d)
    x, y, w, h = (float(v) for v in region)
    if w <= 0 or h <= 0:
        raise ParameterError(f"region must have positive width and height; got {region}")
    out_w, out_h = max(1, round(w / ds)), max(1, round(h / ds))
    nearest = info["kind"] == "labels"
    fill = 255 if info["kind"] == "rgb" else 0
    tif = _open_tiff(path)
    try:
        levels = _levels(tif)
        # Slide pixels per pixel of each level; choose the coarsest not coarser than asked.
        dims = [(p.shape[1], p.shape[0]) for p in levels]
        if dims == pyramid_shapes(info["width"], info["height"], levels[0].tilewidth)[:len(dims)]:
            level_ds = [d * 2**i for i in range(len(dims))]  # exact: each level halves, rounding up
        else:
            level_ds = [d * info["width"] / w for w, _ in dims]
        best = 0
        for i, lds in enumerate(level_ds):
            if lds <= ds * 1.0001:
                best = i
        page, lds = levels[best], level_ds[best]
        lx0, ly0 = x / lds, y / lds
        lx1, ly1 = (x + w) / lds, (y + h) / lds
        ix0, iy0 = math.floor(lx0 + 1e-6), math.floor(ly0 + 1e-6)
        ix1, iy1 = max(ix0 + 1, math.ceil(lx1 - 1e-6)), max(iy0 + 1, math.ceil(ly1 - 1e-6))
        try:
            img = _read_page_region(tif, page, ix0, iy0, ix1, iy1, fill)
        except Exception as exc:  # noqa: BLE001 - damaged tile data
            raise RasterError(f"{path}: cannot decode tiles of level {best} ({exc}); the file is damaged, write it again") from None
    finally:
        tif.close()
    if nearest:
        # Sample each output pixel's centre, mapped to level pixels (exact when grids align).
        iy = np.floor(ly0 + (np.arange(out_h) + 0.5) * (ly1 - ly0) / out_h).astype(np.intp) - iy0
        ix = np.floor(lx0 + (np.arange(out_w) + 0.5) * (lx1 - lx0) / out_w).astype(np.intp) - ix0
        img = img[np.ix_(iy.clip(0, img.shape[0] - 1), ix.clip(0, img.shape[1] - 1))]
    else:
        img = _resize(img, (out_w, out_h))
    return img[..., 0] if img.shape[2] == 1 else img
