"""Whole-slide inference: overlap-tile prediction in bands, then export per slide.

Prediction and post-processing are separate steps so post-processing variants can be
tried without predicting again:

1. :func:`predict_slide` reads the slide at the model's resolution, only where there is
   tissue, normalizes stain exactly as in training, predicts overlapping tiles and
   blends their class probabilities per pixel (``mean`` or ``gaussian`` weights). It
   works through the tile grid one row ("band") at a time, keeping only the rows still
   being blended in memory and writing finished rows to a memory-mapped file on disk;
   a checkpoint after each band makes an interrupted run resumable with the same
   result. The finished probabilities become ``probabilities.tiff``.
2. :func:`export_prediction` post-processes the stored probabilities
   (:mod:`helpers.postprocess`), writes ``labels.tiff``, the QuPath GeoJSON,
   ``overlay.png`` and ``summary.json`` (written last: it marks the slide done).

Memory: both steps hold band buffers (rows x slide width), never the whole raster.
Finished probability rows and label rows go through plain file I/O (:class:`RowStore`:
they sit in the OS page cache, not in the process), the export reads the probability
TIFF in bands of rows (:class:`RasterRows`) and traces GeoJSON regions band by band,
joined across seams. Exceptions: hole filling and small-object removal label connected
components of the whole uint8 label image (1/C of the probabilities) in memory.

Output folder ``workdir/predictions/<slide>/`` (see ``docs/workfolder.md``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from helpers.config import ClassMap, TissueClass, load_class_map
from helpers.errors import ClassMapError, HistoUNetError, OutputExistsError, ParameterError, SlideError
from helpers.io import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

#: Allowed overlap factors -> stride as a fraction of the tile side.
OVERLAP_STRIDE = {1: 1, 4: 2, 16: 4}

#: Rows of the probability raster post-processed / traced at a time by :func:`export_prediction`.
EXPORT_BAND_ROWS = 256

#: Files that mark a prediction folder as holding results.
RESULT_FILES = ("probabilities.tiff", "labels.tiff", "summary.json")

PARTIAL_DIR = ".partial"


class DiskFullError(HistoUNetError):
    """The disk filled up while writing an output (nothing was left under the final name)."""


@dataclass
class PredictionResult:
    """What :func:`predict_slide` did (also stored as ``prediction.json``)."""

    slide: str
    slide_path: str
    out_dir: str
    probabilities: str
    width: int  # raster size at model resolution
    height: int
    downsample: float  # level-0 slide pixels per raster pixel
    mpp: float  # um per raster pixel (the model's)
    slide_mpp: float
    tile_size: int
    stride: int
    overlap: int
    blend: str
    normalizer: str | None
    classes: list[dict]
    tiles_grid: int
    tiles_tissue: int
    seconds: float
    tiles_per_second: float
    resumed_from_band: int = 0
    model_file: str = ""
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


def class_map_from_params(classes: Any, source: str) -> ClassMap:
    """A :class:`ClassMap` from ``training_params.yaml``'s ``classes`` entry.

    Accepts the :meth:`ClassMap.to_dict` form (``{"classes": [{label, name, color}]}``),
    a bare list of such entries, or ``{name: label}``.
    """
    try:
        if isinstance(classes, dict) and "classes" in classes:
            classes = classes["classes"]
        if isinstance(classes, dict):
            items = [TissueClass(int(v), str(k), (128, 128, 128)) for k, v in classes.items()]
        else:
            items = [TissueClass(int(c["label"]), str(c["name"]), tuple(int(v) for v in c.get("color", (128, 128, 128))))
                     for c in classes]
    except (TypeError, KeyError, ValueError):
        raise ClassMapError(f"{source}: 'classes' is not a class map; re-run 05_train_model") from None
    items.sort(key=lambda c: c.label)
    return ClassMap(tuple(items), 0, source)


def _load_model(model_dir: str | Path) -> tuple[Any, dict, ClassMap]:
    from helpers.model import load_trained

    model, params = load_trained(model_dir)
    src = str(Path(model_dir) / "training_params.yaml")
    for key in ("mpp", "tile_size", "classes"):
        if params.get(key) in (None, ""):
            raise ParameterError(f"{src}: missing '{key}'; re-run 05_train_model")
    cmap = class_map_from_params(params["classes"], src)
    n_out = int(model.output_shape[-1])
    if n_out != cmap.n_classes:
        raise ClassMapError(f"{params.get('model_file', model_dir)}: model predicts {n_out} classes but "
                            f"{src} lists {cmap.n_classes} ({', '.join(cmap.names)}); use the matching model folder")
    return model, params, cmap


def check_class_map(model_classes: ClassMap, class_map: ClassMap | str | Path | None) -> ClassMap:
    """The class map to use: the user's one if given (must match the model's), else the model's."""
    if class_map is None:
        return model_classes
    cmap = class_map if isinstance(class_map, ClassMap) else load_class_map(class_map)
    if cmap.names != model_classes.names:
        raise ClassMapError(f"{cmap.source}: classes {cmap.names} do not match the model's {model_classes.names} "
                            f"({model_classes.source}); pass the class map the model was trained with")
    return cmap


def background_index(cmap: ClassMap) -> int:
    """Model channel of the glass/background class ('Background' if present, else channel 0)."""
    for i, c in enumerate(cmap.classes):
        if c.name.lower() in ("background", "glass"):
            return i
    return 0


def tissue_mask(slide, max_size: int = 2048) -> tuple[np.ndarray, float]:
    """Low-resolution tissue mask: not glass (bright, unsaturated) and not black.

    Returns:
        ``(mask, downsample)`` with the mask's level-0 pixels per mask pixel.
    """
    import cv2

    thumb, ds = slide.thumbnail(max_size)
    hsv = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)
    sat, val = hsv[..., 1], hsv[..., 2]
    gray = cv2.cvtColor(thumb, cv2.COLOR_RGB2GRAY)
    mask = ((sat > 20) | (gray < 200)) & (val > 30)
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)).astype(bool)
    return mask, ds


def grid_positions(length: int, tile: int, stride: int) -> list[int]:
    """Tile origins covering ``[0, length)``; the last tile is aligned to the end."""
    if length <= tile:
        return [0]
    pos = list(range(0, length - tile + 1, stride))
    if pos[-1] + tile < length:
        pos.append(length - tile)
    return pos


def blend_weights(tile: int, blend: str) -> np.ndarray:
    """Per-pixel weights of one tile: ones (``mean``) or a Gaussian (sigma = tile/8) floored at 1e-4."""
    if blend == "mean":
        return np.ones((tile, tile), np.float32)
    if blend == "gaussian":
        c = (np.arange(tile, dtype=np.float64) + 0.5 - tile / 2) / (tile / 8)
        g = np.exp(-0.5 * c**2)
        w = np.outer(g, g)
        return np.maximum(w / w.max(), 1e-4).astype(np.float32)
    raise ParameterError(f"blend must be 'gaussian' or 'mean'; got {blend!r}")


def resolve_normalizer(normalizer: str | Path | None, model_dir: Path, params: dict) -> Path | None:
    """Which normalizer file to use: ``"auto"`` = the one training used (``training_params.yaml``)."""
    if normalizer is None or normalizer == "none":
        return None
    if normalizer == "auto":
        rel = params.get("normalizer")
        if not rel:
            return None
        path = Path(rel)
        if not path.is_absolute():
            path = model_dir.parent / path
        if not path.is_file():
            raise ParameterError(f"{path}: the stain normalizer used in training is missing; re-run 02_normalize_stain "
                                 "or pass normalizer=None")
        return path
    path = Path(normalizer)
    if not path.is_file():
        raise ParameterError(f"{path}: stain normalizer not found; pass normalizer='auto', None or an existing normalizer.json")
    return path


def _fingerprint(**items: Any) -> str:
    return hashlib.sha1(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()


def _file_id(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, int(st.st_mtime)]


def _band_done(band: int) -> None:
    """Called after each band is checkpointed (tests inject interruptions here)."""


@contextlib.contextmanager
def _disk_guard(path: Path) -> Iterator[None]:
    """Turn a full disk into a one-line error naming the file."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"{path}: disk full while writing ({exc.strerror}); free space or choose another "
                                "workdir, then run again (finished bands are kept)") from None
        raise


def write_raster(path: Path, array: "np.ndarray | RowStore", *, kind: str, mpp: float, downsample: float, meta: dict,
                 overwrite: bool) -> Path:
    """Write a pyramidal TIFF atomically (nothing under the final name unless complete).

    ``array`` is an in-memory array or a :class:`RowStore`, which the writer reads strip by
    strip (bounded memory).
    """
    from helpers.rasters import write_pyramid_tiff

    h, w = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    with _disk_guard(path), atomic_path(path, overwrite) as tmp:
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
        self._fh = open(self.path, "r+b")  # noqa: SIM115 - closed by close()
        self._strip: tuple[int, int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def write(self, y: int, rows: np.ndarray) -> None:
        """Store ``rows`` from row ``y`` on."""
        rows = np.ascontiguousarray(rows, self.dtype)
        if rows.shape[1:] != self.shape[1:] or y < 0 or y + len(rows) > self.shape[0]:
            raise ValueError(f"{self.path}: rows {rows.shape} at y={y} do not fit {self.shape}")
        self._strip = None
        self._fh.seek(self.offset + y * self.row_bytes)
        self._fh.write(rows.data)

    def read(self, y0: int, y1: int) -> np.ndarray:
        """Rows ``[y0, y1)`` (clipped to the array) as a new array."""
        y0, y1 = max(0, int(y0)), min(self.shape[0], int(y1))
        out = np.empty((max(0, y1 - y0), *self.shape[1:]), self.dtype)
        if out.size:
            self._fh.flush()
            self._fh.seek(self.offset + y0 * self.row_bytes)
            n = self._fh.readinto(memoryview(out).cast("B"))
            if n != out.nbytes:
                raise HistoUNetError(f"{self.path}: file is shorter than its header says; delete it and run again")
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
        if self._strip is None or self._strip[:2] != (y, h):
            self._strip = (y, h, self.read(y, y + h))
        return self._strip[2][:, x:x + w]

    def flush(self) -> None:
        """Push written rows to the OS."""
        self._fh.flush()

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._strip = None
        self._fh.close()


class RasterRows:
    """Rows of a raster TIFF at its own resolution, read on demand (``rows[y0:y1]``,
    ``rows[y0:y1, x0:x1, c]``): a whole-slide probability map used band by band."""

    def __init__(self, path: str | Path) -> None:
        from helpers.rasters import raster_info

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
        from helpers.rasters import read_raster

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


def write_features_stream(features: Iterable[dict], path: Path, overwrite: bool = False) -> int:
    """Write GeoJSON features to a ``FeatureCollection`` file as they come (atomically).

    The same JSON as :func:`helpers.qupath.write_feature_collection`, without holding the
    list: a whole-slide export has one feature per region. Returns the number written.
    """
    n = 0
    with atomic_path(path, overwrite) as tmp, open(tmp, "w") as fh:
        fh.write('{"type": "FeatureCollection", "features": [')
        for feat in features:
            fh.write((", " if n else "") + json.dumps(feat))
            n += 1
        fh.write("]}")
    return n


# --------------------------------------------------------------------------- prediction


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    existing = [out_dir / f for f in RESULT_FILES if (out_dir / f).exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{out_dir}: already holds results ({', '.join(p.name for p in existing)}); "
                                "pass overwrite=True to replace them")
    if overwrite:
        with contextlib.suppress(FileNotFoundError):
            (out_dir / "summary.json").unlink()


def predict_slide(slide_path: str | Path, model_dir: str | Path, out_dir: str | Path, *, mpp: float | None = None,
                  normalizer: str | Path | None = "auto", overlap: int = 16, blend: str = "gaussian",
                  tile_size: int | None = None, batch_size: int = 8, class_map: ClassMap | str | Path | None = None,
                  overwrite: bool = False, progress: bool = True, prefetch: int = 2,
                  checkpoint_seconds: float = 30.0, min_tissue: float = 0.0) -> PredictionResult:
    """Predict class probabilities over a whole slide; write ``probabilities.tiff``.

    Args:
        slide_path: A slide OpenSlide reads.
        model_dir: Trained model folder (``workdir/model``).
        out_dir: This slide's prediction folder (``workdir/predictions/<slide>``).
        mpp: Level-0 um/px override (required when the slide stores none).
        normalizer: ``"auto"`` (what training used), a ``normalizer.json`` path, or None.
        overlap: 1, 4 or 16 tiles over each pixel (stride tile, tile/2, tile/4).
        blend: ``"gaussian"`` (weights fall off towards tile borders) or ``"mean"``.
        tile_size: Model input side in pixels (default: the training tile size).
        batch_size: Tiles per model call.
        class_map: Optional class map to check against the model's classes.
        overwrite: Replace earlier results in ``out_dir``.
        progress: Show a progress bar (tiles/s, ETA).
        prefetch: Bands read and normalized ahead by the background thread.
        checkpoint_seconds: Minimum time between band checkpoints (0 = after every band).
        min_tissue: Fraction of a tile's footprint that must be tissue to predict it
            (0 = any tissue pixel).

    Returns:
        A :class:`PredictionResult` (also written to ``out_dir/prediction.json``).

    Raises:
        SlideError, MissingMppError, ClassMapError, ParameterError, OutputExistsError,
        DiskFullError: one-line errors naming the file or parameter.
    """
    from helpers.slides import open_slide

    t_start = time.perf_counter()
    slide_path, model_dir, out_dir = Path(slide_path), Path(model_dir), Path(out_dir)
    if overlap not in OVERLAP_STRIDE:
        raise ParameterError(f"overlap must be 1, 4 or 16; got {overlap}")
    weights = blend_weights(8, blend)  # validates blend early
    if batch_size < 1:
        raise ParameterError(f"batch_size must be >= 1; got {batch_size}")
    _check_out_dir(out_dir, overwrite)

    model, params, model_classes = _load_model(model_dir)
    cmap = check_class_map(model_classes, class_map)
    n_cls = cmap.n_classes
    bg = background_index(cmap)
    tile = int(tile_size or params["tile_size"])
    in_shape = model.input_shape
    if in_shape[1] is not None and in_shape[1] != tile:
        raise ParameterError(f"tile_size={tile} but the model in {model_dir} takes {in_shape[1]} px tiles; "
                             "leave tile_size=None")
    from helpers.model import SIZE_MULTIPLE

    if tile < SIZE_MULTIPLE or tile % SIZE_MULTIPLE:
        raise ParameterError(f"tile_size must be a multiple of {SIZE_MULTIPLE} (the U-Net halves it five times); "
                             f"got {tile}")
    stride = tile // OVERLAP_STRIDE[overlap]
    weights = blend_weights(tile, blend)
    model_mpp = float(params["mpp"])
    norm_path = resolve_normalizer(normalizer, model_dir, params)

    slide = open_slide(slide_path, mpp=mpp)
    probs_mm: RowStore | None = None
    try:
        slide_mpp = slide.require_mpp()
        ds = slide.downsample_for(model_mpp)
        W, H = slide.size_at(ds)
        if W < tile or H < tile:
            raise SlideError(f"{slide_path}: {W}x{H} px at {model_mpp} um/px is smaller than one {tile} px tile; "
                             "use a smaller tile_size or a larger slide")
        mask, mask_ds = tissue_mask(slide)
        xs, ys = grid_positions(W, tile, stride), grid_positions(H, tile, stride)
        f = ds / mask_ds  # mask pixels per raster pixel
        tissue: list[list[int]] = []
        for y in ys:
            row = []
            y0, y1 = int(y * f), max(int(y * f) + 1, math.ceil((y + tile) * f))
            for x in xs:
                x0, x1 = int(x * f), max(int(x * f) + 1, math.ceil((x + tile) * f))
                frac = mask[y0:y1, x0:x1].mean() if mask[y0:y1, x0:x1].size else 0.0
                if frac > min_tissue:
                    row.append(x)
            tissue.append(row)
        n_tissue = sum(len(r) for r in tissue)
        n_grid = len(xs) * len(ys)
        if n_tissue == 0:
            raise SlideError(f"{slide_path}: no tissue found (the slide looks like blank glass); check the slide "
                             "or its mpp")
        log.info("%s: %dx%d px at %.3g um/px (downsample %.3g), %d of %d tiles on tissue, tile %d stride %d",
                 slide.name, W, H, model_mpp, ds, n_tissue, n_grid, tile, stride)

        norm_fn = _slide_normalizer(norm_path, slide, tissue, ys, tile, ds)

        # ---- resumable state
        fp = _fingerprint(slide=_file_id(slide_path), model=_file_id(Path(params["model_file"])), ds=ds, tile=tile,
                          stride=stride, blend=blend, normalizer=str(norm_path) if norm_path else None,
                          batch=batch_size, n_cls=n_cls, mpp=slide_mpp, min_tissue=min_tissue)
        part = out_dir / PARTIAL_DIR
        state = _load_state(part, fp)
        out_dir.mkdir(parents=True, exist_ok=True)
        if state is None:
            shutil.rmtree(part, ignore_errors=True)
            part.mkdir(parents=True)
            with _disk_guard(part / "probabilities.npy"):
                probs_mm = RowStore(part / "probabilities.npy", (H, W, n_cls), np.uint8, create=True)
            acc = np.zeros((tile, W, n_cls), np.float32)
            wsum = np.zeros((tile, W), np.float32)
            start_band, tiles_done, seconds_before = 0, 0, 0.0
        else:
            probs_mm = RowStore(part / "probabilities.npy")
            acc, wsum = np.load(part / "acc.npy"), np.load(part / "wsum.npy")
            start_band, tiles_done, seconds_before = state["next_band"], state["tiles_done"], state["seconds"]
            log.info("%s: resuming at band %d of %d (%d tiles done)", slide.name, start_band, len(ys), tiles_done)

        predict_fn = _make_predict_fn(model, batch_size, tile, n_cls)
        from tqdm.auto import tqdm

        bar = tqdm(total=n_tissue, initial=tiles_done, unit="tile", desc=f"predict {slide.name}",
                   disable=not progress, smoothing=0.1)
        t_loop = time.perf_counter()
        last_ckpt = time.perf_counter()
        tiles_now = 0
        pend_x: list[int] = []
        pend_t: list[np.ndarray] = []
        try:
            for b, y, row_x, batch, band_end in _prefetch(_read_bands(slide, ys, tissue, tile, ds, norm_fn,
                                                                      start_band), prefetch):
                # full model batches across runs of the band; the float32 outputs held are one batch
                pend_x.extend(row_x)
                pend_t.extend(batch)
                while len(pend_x) >= batch_size or (band_end and pend_x):
                    xs_b, tiles_b = pend_x[:batch_size], np.stack(pend_t[:batch_size])
                    del pend_x[:batch_size], pend_t[:batch_size]
                    probs = predict_fn(tiles_b)
                    for x, p in zip(xs_b, probs):
                        acc[:, x:x + tile] += p * weights[..., None]
                        wsum[:, x:x + tile] += weights
                    del probs, tiles_b
                    tiles_now += len(xs_b)
                    bar.update(len(xs_b))
                if not band_end:
                    continue
                # rows above the next band's top are final
                y_next = ys[b + 1] if b + 1 < len(ys) else H
                done = y_next - y
                with _disk_guard(part / "probabilities.npy"):
                    probs_mm.write(y, _finalize(acc[:done], wsum[:done], bg))
                _shift_rows(acc, done)
                _shift_rows(wsum, done)
                last = b + 1 == len(ys)
                if last or time.perf_counter() - last_ckpt >= checkpoint_seconds:
                    elapsed = seconds_before + time.perf_counter() - t_loop
                    _save_state(part, fp, probs_mm, acc, wsum, b + 1, tiles_done + tiles_now, elapsed)
                    last_ckpt = time.perf_counter()
                _band_done(b)
        finally:
            bar.close()
        loop_seconds = time.perf_counter() - t_loop
        probs_mm.flush()
        del acc, wsum  # the pyramid writer's buffers take their place, not add to them

        meta = {"slide": slide.name, "classes": cmap.names, "overlap": overlap, "blend": blend, "tile_size": tile}
        prob_path = out_dir / "probabilities.tiff"
        write_raster(prob_path, probs_mm, kind="probabilities", mpp=model_mpp, downsample=ds, meta=meta,
                     overwrite=True)
        seconds = time.perf_counter() - t_start + seconds_before
        result = PredictionResult(
            slide=slide.name, slide_path=str(slide_path), out_dir=str(out_dir), probabilities=str(prob_path),
            width=W, height=H, downsample=ds, mpp=model_mpp, slide_mpp=slide_mpp, tile_size=tile, stride=stride,
            overlap=overlap, blend=blend, normalizer=str(norm_path) if norm_path else None,
            classes=cmap.to_dict()["classes"], tiles_grid=n_grid, tiles_tissue=n_tissue, seconds=round(seconds, 2),
            tiles_per_second=round(tiles_now / loop_seconds, 2) if loop_seconds > 0 and tiles_now else 0.0,
            resumed_from_band=start_band, model_file=str(params["model_file"]),
            extra={"slide_mpp_source": slide.mpp_source, "batch_size": batch_size},
        )
        with _disk_guard(out_dir / "prediction.json"):
            write_json(asdict(result), out_dir / "prediction.json", overwrite=True)
        probs_mm.close()
        shutil.rmtree(part, ignore_errors=True)
        log.info("%s: %d tiles in %.1f s (%.1f tiles/s)", slide.name, n_tissue, seconds, result.tiles_per_second)
        return result
    finally:
        if probs_mm is not None:
            probs_mm.close()
        slide.close()


def _finalize(acc: np.ndarray, wsum: np.ndarray, bg: int, chunk_rows: int = 64) -> np.ndarray:
    """Blended probabilities -> uint8 0-255; pixels no tile covered are background.

    Works ``chunk_rows`` rows at a time, so its float temporaries are a few rows, not the band.
    """
    out = np.empty(acc.shape, np.uint8)
    for r in range(0, acc.shape[0], chunk_rows):
        a, w = acc[r:r + chunk_rows], wsum[r:r + chunk_rows]
        covered = w > 0
        q = a / np.where(covered, w, 1.0)[..., None]
        q[~covered] = 0.0
        q[~covered, bg] = 1.0
        q *= 255.0
        np.rint(q, out=q)
        np.clip(q, 0, 255, out=q)
        out[r:r + chunk_rows] = q
    return out


def _shift_rows(buf: np.ndarray, done: int, chunk_rows: int = 64) -> None:
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


def _load_state(part: Path, fp: str) -> dict | None:
    f = part / "state.json"
    if not f.is_file():
        return None
    try:
        state = read_json(f)
    except (OSError, ValueError):
        return None
    if state.get("fingerprint") != fp or not all((part / n).is_file() for n in ("acc.npy", "wsum.npy", "probabilities.npy")):
        log.info("%s: earlier partial run used other inputs or parameters; starting again", part)
        return None
    return state


def _save_state(part: Path, fp: str, probs_mm: RowStore, acc: np.ndarray, wsum: np.ndarray, next_band: int,
                tiles_done: int, seconds: float) -> None:
    with _disk_guard(part):
        probs_mm.flush()
        for name, arr in (("acc.npy", acc), ("wsum.npy", wsum)):
            with atomic_path(part / name, overwrite=True) as tmp:
                np.save(tmp, arr)
        write_json({"fingerprint": fp, "next_band": next_band, "tiles_done": tiles_done, "seconds": seconds},
                   part / "state.json", overwrite=True)


def _slide_normalizer(norm_path: Path | None, slide, tissue: list[list[int]], ys: list[int], tile: int,
                      ds: float) -> Callable[[np.ndarray], np.ndarray] | None:
    """Per-slide stain normalizer estimated from up to 8 evenly spread tissue tiles."""
    if norm_path is None:
        return None
    from helpers.stain import load_normalizer

    cells = [(y, x) for y, row in zip(ys, tissue) for x in row]
    pick = np.linspace(0, len(cells) - 1, num=min(8, len(cells))).round().astype(int)
    samples = [np.array(slide.read(round(cells[i][1] * ds), round(cells[i][0] * ds), tile, tile, ds)) for i in pick]
    return load_normalizer(norm_path).for_slide(samples)


def _read_bands(slide, ys: list[int], tissue: list[list[int]], tile: int, ds: float,
                norm_fn: Callable[[np.ndarray], np.ndarray] | None, start: int,
                max_span: int = 4096) -> Iterator[tuple[int, int, list[int], np.ndarray, bool]]:
    """Yield ``(band, y, tile x positions, uint8 tiles, last of band)`` reading runs of tiles as one region.

    Each item is one run (at most ``max_span`` px wide), not a whole band, so what the
    prefetch queue holds does not grow with the slide's width; a band without tissue
    yields one empty item so the consumer still finishes its rows.
    """
    for b in range(start, len(ys)):
        y, row = ys[b], tissue[b]
        if not row:
            yield b, y, [], np.empty((0, tile, tile, 3), np.uint8), True
            continue
        i = 0
        while i < len(row):
            j = i
            while j + 1 < len(row) and row[j + 1] + tile - row[i] <= max_span:
                j += 1
            x0, span = row[i], row[j] + tile - row[i]
            region = slide.read(round(x0 * ds), round(y * ds), span, tile, ds)
            if norm_fn is not None:
                region = np.asarray(norm_fn(np.array(region)), np.uint8)
            tiles = np.empty((j + 1 - i, tile, tile, 3), np.uint8)
            for k in range(i, j + 1):
                tiles[k - i] = region[:, row[k] - x0:row[k] - x0 + tile]
            del region
            yield b, y, row[i:j + 1], tiles, j + 1 == len(row)
            i = j + 1


def _prefetch(it: Iterator, depth: int) -> Iterator:
    """Run an iterator in a background thread, ``depth`` items ahead; re-raise its errors."""
    if depth <= 0:
        yield from it
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    sentinel = object()

    def work() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(sentinel)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put(exc)

    th = threading.Thread(target=work, name="slide-reader", daemon=True)
    th.start()
    try:
        while True:
            item = q.get()
            if item is sentinel:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                q.get_nowait()
        th.join(timeout=5)


def _make_predict_fn(model, batch_size: int, tile: int, n_cls: int) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 tiles -> float32 probabilities, in fixed-size (padded) batches: one trace, same results."""
    import tensorflow as tf

    from helpers.model import preprocess

    @tf.function(input_signature=[tf.TensorSpec((batch_size, tile, tile, 3), tf.uint8)], reduce_retracing=True)
    def run(x):
        return model(preprocess(x), training=False)

    def predict(tiles: np.ndarray) -> np.ndarray:
        out = np.empty((len(tiles), tile, tile, n_cls), np.float32)
        for i in range(0, len(tiles), batch_size):
            chunk = tiles[i:i + batch_size]
            n = len(chunk)
            if n < batch_size:
                chunk = np.concatenate([chunk, np.full((batch_size - n, tile, tile, 3), 255, np.uint8)])
            out[i:i + n] = run(tf.constant(chunk)).numpy()[:n]
        return out

    return predict


# --------------------------------------------------------------------------- reading results


def _prob_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "probabilities.tiff"
    if not path.is_file():
        raise HistoUNetError(f"{path}: probabilities not found; run predict_slide (07_infer_slide) first")
    return path


def read_probabilities(path: str | Path, region: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Class probabilities ``(H, W, C)`` float32 in [0, 1] at model resolution.

    Args:
        path: A prediction folder (``workdir/predictions/<slide>``) or its ``probabilities.tiff``.
        region: Optional ``(x, y, w, h)`` in raster (model-resolution) pixels.
    """
    from helpers.rasters import read_raster

    arr = np.asarray(read_raster(_prob_path(path)))
    if arr.ndim == 2:
        arr = arr[..., None]
    if region is not None:
        x, y, w, h = region
        arr = arr[y:y + h, x:x + w]
    return arr.astype(np.float32) / 255.0


def read_prediction_info(path: str | Path) -> dict:
    """``prediction.json`` of a prediction folder (size, downsample, mpp, classes, timings)."""
    f = Path(path) / "prediction.json" if Path(path).is_dir() else Path(path)
    if not f.is_file():
        raise HistoUNetError(f"{f}: not found; run predict_slide (07_infer_slide) first")
    return read_json(f)


# --------------------------------------------------------------------------- export


def export_prediction(pred_dir: str | Path, *, class_map: ClassMap | str | Path | None = None,
                      smoothing: str | None = "gaussian", smoothing_size: float = 2.0, opening_px: int = 0,
                      closing_px: int = 0, fill_holes_um2: float | None = None, min_area_um2: float | None = 0.0,
                      object_type: str = "annotation", exclude_classes: tuple[str, ...] = ("Background",),
                      overwrite: bool = False, thumbnail_size: int = 1024) -> dict:
    """Post-process stored probabilities and write labels, GeoJSON, overlay and summary.

    Args:
        pred_dir: Folder written by :func:`predict_slide`.
        class_map: Class map (default: the model's, stored in ``prediction.json``).
        smoothing, smoothing_size, opening_px, closing_px, fill_holes_um2, min_area_um2:
            See :func:`helpers.postprocess.postprocess`.
        object_type: ``"annotation"`` or ``"detection"`` for the QuPath objects.
        exclude_classes: Classes not exported to GeoJSON (glass).
        overwrite: Replace earlier labels/GeoJSON/summary.
        thumbnail_size: Longer side of ``overlay.png``'s slide thumbnail.

    Returns:
        The summary dict (also ``summary.json``, written last).
    """
    from helpers import postprocess as pp
    from helpers.pretrained import read_start_record
    from helpers.qupath import iter_label_features
    from helpers.slides import open_slide
    from helpers.viz import save_figure

    pred_dir = Path(pred_dir)
    info = read_prediction_info(pred_dir)
    model_cmap = class_map_from_params(info["classes"], str(pred_dir / "prediction.json"))
    cmap = check_class_map(model_cmap, class_map)
    slide_name = info["slide"]
    outputs = {"labels": pred_dir / "labels.tiff", "geojson": pred_dir / f"{slide_name}.geojson",
               "overlay": pred_dir / "overlay.png", "summary": pred_dir / "summary.json"}
    if not overwrite:
        for p in outputs.values():
            if p.exists():
                raise OutputExistsError(f"{p}: already exists; pass overwrite=True to replace it")
    t0 = time.perf_counter()
    # Bounded memory: probabilities are read in bands of rows (twice: labels, then region
    # means); labels go to row files on disk (page cache, not this process's memory),
    # except when hole filling / small-object removal need the whole uint8 label image.
    probs = RasterRows(_prob_path(pred_dir))
    if probs.ndim == 2:
        raise HistoUNetError(f"{_prob_path(pred_dir)}: one channel only; run predict_slide again")
    ds, mpp = float(info["downsample"]), float(info["mpp"])
    H, W = probs.shape[:2]
    with _disk_guard(pred_dir), tempfile.TemporaryDirectory(prefix=".export.", dir=pred_dir) as scratch_dir:
        out_store = RowStore(Path(scratch_dir) / "labels.npy", (H, W), np.uint8, create=True)
        tmp_store = RowStore(Path(scratch_dir) / "smoothed.npy", (H, W), np.uint8, create=True) \
            if (opening_px or closing_px) else None
        try:
            labels, _ = pp.postprocess_labels(probs, mpp=info["mpp"], smoothing=smoothing,
                                              smoothing_size=smoothing_size, opening_px=opening_px,
                                              closing_px=closing_px, fill_holes_um2=fill_holes_um2,
                                              min_area_um2=min_area_um2, background_label=background_index(cmap) + 1,
                                              band_rows=EXPORT_BAND_ROWS, out=out_store, scratch=tmp_store)
            if tmp_store is not None:
                tmp_store.close()
            meta = {"slide": slide_name, "classes": cmap.names}
            write_raster(outputs["labels"], labels, kind="labels", mpp=mpp, downsample=ds, meta=meta, overwrite=True)
            features = iter_label_features(labels, cmap, ds, probabilities=probs, object_type=object_type,
                                           mpp=info["slide_mpp"], exclude=exclude_classes,
                                           band_rows=EXPORT_BAND_ROWS)
            with _disk_guard(outputs["geojson"]):
                n_features = write_features_stream(features, outputs["geojson"], overwrite=True)
            summary = summarize(labels, cmap, mpp)
        finally:
            out_store.close()
            if tmp_store is not None:
                tmp_store.close()

    from helpers.rasters import read_raster

    with open_slide(info["slide_path"], mpp=info["slide_mpp"]) as slide:
        thumb, tds = slide.thumbnail(thumbnail_size)
    small = np.asarray(read_raster(outputs["labels"], downsample=tds))  # the pyramid's low level, not the image
    fig = overlay_figure(thumb, small, cmap, title=f"{slide_name}: predicted classes")
    with _disk_guard(outputs["overlay"]):
        save_figure(fig, outputs["overlay"], overwrite=True)
    import matplotlib.pyplot as plt

    plt.close(fig)
    summary.update({
        "slide": slide_name, "slide_path": info["slide_path"], "features": n_features,
        "tiles": info["tiles_tissue"], "tiles_grid": info["tiles_grid"], "predict_seconds": info["seconds"],
        "tiles_per_second": info["tiles_per_second"], "postprocess_seconds": round(time.perf_counter() - t0, 2),
        "raster": {"width": info["width"], "height": info["height"], "downsample": ds, "mpp": mpp},
        "parameters": {"overlap": info["overlap"], "blend": info["blend"], "tile_size": info["tile_size"],
                       "normalizer": info["normalizer"], "smoothing": smoothing, "smoothing_size": smoothing_size,
                       "opening_px": opening_px, "closing_px": closing_px, "fill_holes_um2": fill_holes_um2,
                       "min_area_um2": min_area_um2, "object_type": object_type},
        "outputs": {k: str(v.name) for k, v in outputs.items()},
        "encoder_weights_start": read_start_record(Path(info.get("model_file") or "?").parent),
    })
    with _disk_guard(outputs["summary"]):
        write_json(summary, outputs["summary"], overwrite=True)
    return summary


def summarize(labels: np.ndarray, cmap: ClassMap, mpp: float) -> dict:
    """Areas per class in mm^2 and the tumour fraction of the tissue (non-background) area."""
    counts = np.zeros(256, np.int64)
    for y in range(0, labels.shape[0], 1024):  # in bands: bincount would copy the image as int64
        counts += np.bincount(np.asarray(labels[y:y + 1024]).ravel(), minlength=256)
    px_mm2 = (mpp / 1000.0) ** 2
    areas = {c.name: round(float(counts[c.label] * px_mm2), 6) for c in cmap.classes}
    bg = cmap.classes[background_index(cmap)].name
    tissue = sum(v for k, v in areas.items() if k != bg)
    tumour = next((c.name for c in cmap.classes if c.name.lower() in ("tumor", "tumour")), None)
    frac = areas[tumour] / tissue if tumour and tissue > 0 else 0.0
    return {"areas_mm2": areas, "tissue_mm2": round(tissue, 6), "tumour_fraction": round(frac, 4)}


def overlay_figure(thumb: np.ndarray, labels: np.ndarray, cmap: ClassMap, title: str = "", alpha: float = 0.45):
    """Figure: slide thumbnail | class overlay (Background left clear), with a legend."""
    import cv2
    import matplotlib.pyplot as plt

    from helpers.viz import legend_handles, overlay

    small = cv2.resize(labels, (thumb.shape[1], thumb.shape[0]), interpolation=cv2.INTER_NEAREST)
    bg_label = cmap.classes[background_index(cmap)].label
    fig, axes = plt.subplots(1, 2, figsize=(12, 6 * thumb.shape[0] / max(1, thumb.shape[1]) + 0.8))
    axes[0].imshow(thumb)
    axes[0].set_title("slide")
    axes[1].imshow(overlay(thumb, small, cmap, alpha=alpha, hidden=(bg_label,)))
    axes[1].set_title("prediction")
    for ax in axes:
        ax.axis("off")
    axes[1].legend(handles=legend_handles(cmap), loc="lower right", fontsize=8, framealpha=0.8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def infer_slide(slide_path: str | Path, workdir: str | Path, *, model_dir: str | Path | None = None,
                mpp: float | None = None, overwrite: bool = False, predict_kwargs: dict | None = None,
                export_kwargs: dict | None = None) -> dict:
    """Predict and export one slide into ``workdir/predictions/<slide>/`` (the batch path)."""
    workdir = Path(workdir)
    out_dir = workdir / "predictions" / Path(slide_path).stem
    predict_slide(slide_path, model_dir or workdir / "model", out_dir, mpp=mpp, overwrite=overwrite,
                  **(predict_kwargs or {}))
    return export_prediction(out_dir, overwrite=True, **(export_kwargs or {}))


# --------------------------------------------------------------------------- viewer


def _png(img: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2BGR))
    return buf.tobytes()


def heatmap(prob: np.ndarray, image: np.ndarray, alpha: float) -> np.ndarray:
    """Blend a 0-1 probability map (matplotlib 'inferno') over an RGB image."""
    import matplotlib

    color = (matplotlib.colormaps["inferno"](np.clip(prob, 0, 1))[..., :3] * 255).astype(np.float32)
    out = image.astype(np.float32) * (1 - alpha) + color * alpha
    return out.round().astype(np.uint8)


def prediction_viewer(pred_dir: str | Path, class_map: ClassMap | str | Path | None = None, max_size: int = 1024,
                      zoom_size: int = 384):
    """An ipywidgets viewer of one slide's prediction (call only when a person looks).

    Left: the slide thumbnail with the class overlay (opacity slider, class toggles,
    raw argmax vs post-processed) or the tumour-probability heat map. Right: a zoom at
    model resolution around the point chosen with the x/y sliders.

    Returns:
        An ``ipywidgets.VBox``.
    """
    import ipywidgets as w

    from helpers.rasters import read_raster
    from helpers.slides import open_slide
    from helpers.viz import overlay

    pred_dir = Path(pred_dir)
    info = read_prediction_info(pred_dir)
    cmap = check_class_map(class_map_from_params(info["classes"], str(pred_dir)), class_map)
    slide = open_slide(info["slide_path"], mpp=info["slide_mpp"])
    thumb, tds = slide.thumbnail(max_size)
    ds = float(info["downsample"])
    has_labels = (pred_dir / "labels.tiff").is_file()
    post_small = np.asarray(read_raster(pred_dir / "labels.tiff", downsample=tds)) if has_labels else None
    probs_small = np.asarray(read_raster(_prob_path(pred_dir), downsample=tds))
    probs_small = probs_small.astype(np.float32) / 255.0
    raw_small = (np.argmax(probs_small, -1) + 1).astype(np.uint8)
    tumour = next((i for i, c in enumerate(cmap.classes) if c.name.lower() in ("tumor", "tumour")), 0)

    def fit(a: np.ndarray) -> np.ndarray:
        import cv2

        if a.shape[:2] == thumb.shape[:2]:
            return a
        interp = cv2.INTER_NEAREST if a.dtype == np.uint8 and a.ndim == 2 else cv2.INTER_LINEAR
        return cv2.resize(a, (thumb.shape[1], thumb.shape[0]), interpolation=interp)

    modes = (["post-processed classes"] if has_labels else []) + ["raw argmax classes", f"{cmap.names[tumour]} probability"]
    mode = w.Dropdown(options=modes, description="show")
    opacity = w.FloatSlider(value=0.45, min=0, max=1, step=0.05, description="opacity")
    toggles = [w.Checkbox(value=c.name.lower() not in ("background", "glass"), description=c.name, indent=False)
               for c in cmap.classes]
    zx = w.FloatSlider(value=0.5, min=0, max=1, step=0.01, description="zoom x")
    zy = w.FloatSlider(value=0.5, min=0, max=1, step=0.01, description="zoom y")
    left, right = w.Image(format="png"), w.Image(format="png")
    label = w.HTML()

    def render(*_: Any) -> None:
        hidden = [c.label for c, t in zip(cmap.classes, toggles) if not t.value]
        if mode.value.endswith("probability"):
            pic = heatmap(fit(probs_small[..., tumour]), thumb, opacity.value)
        else:
            lab = post_small if mode.value.startswith("post") else raw_small
            pic = overlay(thumb, fit(lab), cmap, alpha=opacity.value, hidden=hidden)
        left.value = _png(pic)
        # zoom at model resolution
        cx, cy = zx.value * info["width"], zy.value * info["height"]
        x0 = int(np.clip(cx - zoom_size / 2, 0, max(0, info["width"] - zoom_size)))
        y0 = int(np.clip(cy - zoom_size / 2, 0, max(0, info["height"] - zoom_size)))
        zw, zh = min(zoom_size, info["width"]), min(zoom_size, info["height"])
        img = slide.read(round(x0 * ds), round(y0 * ds), zw, zh, ds)
        region = (x0 * ds, y0 * ds, zw * ds, zh * ds)
        if mode.value.endswith("probability"):
            p = np.asarray(read_raster(_prob_path(pred_dir), downsample=ds, region=region))[..., tumour] / 255.0
            zpic = heatmap(p[:zh, :zw], img, opacity.value)
        else:
            if mode.value.startswith("post"):
                lab = np.asarray(read_raster(pred_dir / "labels.tiff", downsample=ds, region=region))
            else:
                p = np.asarray(read_raster(_prob_path(pred_dir), downsample=ds, region=region))
                lab = (np.argmax(p, -1) + 1).astype(np.uint8)
            zpic = overlay(img, lab[:zh, :zw], cmap, alpha=opacity.value, hidden=hidden)
        right.value = _png(zpic)
        label.value = (f"<b>{info['slide']}</b>: zoom at model resolution ({info['mpp']} um/px), "
                       f"x={x0}..{x0 + zw}, y={y0}..{y0 + zh} model px")

    for wid in [mode, opacity, zx, zy, *toggles]:
        wid.observe(render, names="value")
    render()
    return w.VBox([w.HBox([mode, opacity]), w.HBox(toggles), w.HBox([zx, zy]), label, w.HBox([left, right])])


# --------------------------------------------------------------------------- figures


def _thumb_and(pred_dir: Path, max_size: int) -> tuple[dict, np.ndarray, float]:
    from helpers.slides import open_slide

    info = read_prediction_info(pred_dir)
    with open_slide(info["slide_path"], mpp=info["slide_mpp"]) as slide:
        thumb, tds = slide.thumbnail(max_size)
    return info, thumb, tds


def probability_figure(pred_dir: str | Path, class_name: str = "Tumor", max_size: int = 1024):
    """Figure: slide thumbnail | probability heat map of one class (0-1)."""
    import cv2
    import matplotlib.pyplot as plt

    from helpers.rasters import read_raster

    pred_dir = Path(pred_dir)
    info, thumb, tds = _thumb_and(pred_dir, max_size)
    names = [c["name"] for c in info["classes"]]
    if class_name not in names:
        raise ParameterError(f"class_name {class_name!r} is not one of the model's classes {names}")
    p = np.asarray(read_raster(_prob_path(pred_dir), downsample=tds))[..., names.index(class_name)] / 255.0
    p = cv2.resize(p.astype(np.float32), (thumb.shape[1], thumb.shape[0]), interpolation=cv2.INTER_LINEAR)
    fig, axes = plt.subplots(1, 2, figsize=(12, 6 * thumb.shape[0] / thumb.shape[1] + 0.8))
    axes[0].imshow(thumb)
    axes[0].set_title(info["slide"])
    im = axes[1].imshow(p, cmap="inferno", vmin=0, vmax=1)
    axes[1].set_title(f"{class_name} probability ({info['tiles_tissue']} tiles, overlap {info['overlap']}, "
                      f"{info['blend']})")
    for ax in axes:
        ax.axis("off")
    fig.colorbar(im, ax=axes[1], fraction=0.035)
    fig.tight_layout()
    return fig


def postprocess_figure(pred_dir: str | Path, max_size: int = 1024):
    """Figure: raw argmax vs post-processed labels (``labels.tiff``) over the thumbnail.

    Both are computed at (at most) twice the thumbnail's resolution, from the rasters'
    pyramids, so the figure costs the same memory for any slide size; the changed-pixel
    share in the title is measured at that resolution.
    """
    from helpers import postprocess as pp
    from helpers.rasters import read_raster

    pred_dir = Path(pred_dir)
    info, thumb, tds = _thumb_and(pred_dir, max_size)
    cmap = class_map_from_params(info["classes"], str(pred_dir))
    d = max(float(info["downsample"]), tds / 2)
    raw = pp.argmax_labels(np.asarray(read_raster(_prob_path(pred_dir), downsample=d)))
    post = np.asarray(read_raster(pred_dir / "labels.tiff", downsample=d))
    return pp.before_after_figure(thumb, raw, post, cmap, max_size=max_size)


def geojson_figure(pred_dir: str | Path, max_size: int = 1024):
    """Figure: the exported GeoJSON outlines (holes dashed) drawn over the slide thumbnail."""
    import matplotlib.pyplot as plt
    from shapely.geometry import shape

    from helpers.viz import legend_handles

    pred_dir = Path(pred_dir)
    info, thumb, tds = _thumb_and(pred_dir, max_size)
    cmap = class_map_from_params(info["classes"], str(pred_dir))
    fc = read_json(pred_dir / f"{info['slide']}.geojson")
    fig, ax = plt.subplots(figsize=(9, 9 * thumb.shape[0] / thumb.shape[1] + 0.5))
    ax.imshow(thumb)
    n_holes = 0
    for f in fc["features"]:
        geom = shape(f["geometry"])
        color = np.array(f["properties"]["classification"]["color"]) / 255
        for poly in getattr(geom, "geoms", [geom]):
            x, y = np.asarray(poly.exterior.coords).T / tds
            ax.plot(x, y, color=color, lw=1.2)
            for ring in poly.interiors:
                x, y = np.asarray(ring.coords).T / tds
                ax.plot(x, y, color=color, lw=1.0, ls="--")
                n_holes += 1
    ax.set_title(f"{info['slide']}.geojson: {len(fc['features'])} regions, {n_holes} holes (dashed)")
    ax.axis("off")
    ax.legend(handles=legend_handles(cmap), loc="lower right", fontsize=8, framealpha=0.8)
    fig.tight_layout()
    return fig
