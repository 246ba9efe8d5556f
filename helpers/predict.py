"""Whole-slide prediction (07, step 1): slide -> ``probabilities.tiff``.

:func:`predict_slide` reads the slide at the model's resolution, only where there is
tissue (:func:`helpers.tissue.slide_tissue_mask`), normalizes stain exactly as in
training, predicts overlapping tiles and blends their class probabilities per pixel
(``mean`` or ``gaussian`` weights). It works through the tile grid one row ("band") at
a time, keeping only the rows still being blended in memory and writing finished rows
to a row file on disk (:class:`helpers.rowstore.RowStore`: the OS page cache, not this
process); a checkpoint after each band makes an interrupted run resumable with the same
result. The finished probabilities become ``probabilities.tiff`` plus ``prediction.json``.

Post-processing and export are :mod:`helpers.export`; figures and the viewer are
:mod:`helpers.views.predict`. Output folder ``workdir/predictions/<slide>/`` (see
``docs/workfolder.md``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from helpers.accumulate import BandAccumulator
from helpers.config import ClassMap
from helpers.errors import HistoUNetError, ParameterError, SlideError
from helpers.io import atomic_path, make_dir, read_json, resumable_or_nothing, write_json
from helpers.model import (SIZE_MULTIPLE, background_index, check_class_map, check_outputs, keras_input_shape,
                           load_model_and_classes, params_and_classes)
from helpers.rowstore import RowStore, disk_full_guard, write_raster
from helpers.teacher import blend_teacher, check_teacher, load_teacher
from helpers.steps import DONE, file_id, fingerprint_of, guard_output, reuse_or_guard, start_in_place
from helpers.strips import read_bands
from helpers.tissue import slide_tissue_mask, tissue_mask_size, tissue_tiles

log = logging.getLogger(__name__)

OVERLAP_STRIDE = {1: 1, 4: 2, 16: 4}


#: Files that mark a prediction folder as holding results.
RESULT_FILES = ("probabilities.tiff", "labels.tiff", "summary.json", DONE)

PARTIAL_DIR = ".partial"


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


# --------------------------------------------------------------------------- grid, blending, resume state


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


def _band_done(band: int) -> None:
    """Called after each band is checkpointed (tests inject interruptions here)."""


# --------------------------------------------------------------------------- prediction


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a folder holding results unless ``overwrite``; when overwriting, drop the done markers first."""
    existing = [out_dir / f for f in RESULT_FILES if (out_dir / f).exists()]
    if existing:
        guard_output(out_dir, overwrite, what=f"results: {', '.join(p.name for p in existing)}")
    if overwrite:
        for marker in ("summary.json", DONE):
            with contextlib.suppress(FileNotFoundError):
                (out_dir / marker).unlink()


def predict_slide(slide_path: str | Path, model_dir: str | Path, out_dir: str | Path, *, mpp: float | None = None,
                  normalizer: str | Path | None = "auto", overlap: int = 16, blend: str = "mean",
                  tile_size: int | None = None, batch_size: int = 8, class_map: ClassMap | str | Path | None = None,
                  overwrite: bool = False, progress: bool = True, prefetch: int = 2,
                  checkpoint_seconds: float = 30.0, min_tissue: float = 0.0, runtime: str = "keras",
                  teacher: str | Path | None = None, teacher_weight: float = 0.0) -> PredictionResult:
    """Predict class probabilities over a whole slide; write ``probabilities.tiff``.

    Args:
        slide_path: A slide OpenSlide reads.
        model_dir: Trained model folder (``workdir/model``).
        out_dir: This slide's prediction folder (``workdir/predictions/<slide>``).
        mpp: Level-0 um/px override (required when the slide stores none).
        normalizer: ``"auto"`` (what training used), a ``normalizer.json`` path, or None.
        overlap: 1, 4 or 16 tiles over each pixel (stride tile, tile/2, tile/4).
        blend: ``"mean"`` (default: best of 08's variants study, README) or ``"gaussian"`` (weights fall off
            towards tile borders).
        tile_size: Model input side in pixels (default: the training tile size).
        batch_size: Tiles per model call.
        class_map: Optional class map to check against the model's classes.
        overwrite: Replace earlier results in ``out_dir``.
        progress: Show a progress bar (tiles/s, ETA).
        prefetch: Bands read and normalized ahead by the background thread.
        checkpoint_seconds: Minimum time between band checkpoints (0 = after every band).
        min_tissue: Fraction of a tile's footprint that must be tissue to predict it
            (0 = any tissue pixel).
        runtime: ``"auto"`` (OpenVINO, else ONNX Runtime, when installed and proven equivalent;
            else Keras), ``"openvino"``, ``"onnxruntime"``, ``"keras"``, or ``"openvino-bf16"``
            (bfloat16 where the CPU has it: faster, not equivalent; only when asked for)
            (:mod:`helpers.runtime`).
        teacher: 03's forest (``labels/teacher.joblib``) to average with the U-Net (:mod:`helpers.teacher`).
        teacher_weight: The forest's share of each pixel's probabilities (0 = the U-Net alone).

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
    from helpers.runtime import RUNTIMES

    if runtime not in RUNTIMES:
        raise ParameterError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")
    if batch_size < 1:
        raise ParameterError(f"batch_size must be >= 1; got {batch_size}")
    use_teacher = bool(teacher) and teacher_weight > 0
    if not 0.0 <= teacher_weight <= 1.0:
        raise ParameterError(f"teacher_weight must be in [0, 1]; got {teacher_weight}")
    teach = load_teacher(teacher) if use_teacher else None  # a missing teacher fails here, before any work
    fingerprint = fingerprint_of(dict(mpp=mpp, normalizer=normalizer, overlap=overlap, blend=blend, tile_size=tile_size,
                                      min_tissue=min_tissue, runtime=runtime, classes=getattr(class_map, "names", class_map),
                                      teacher_weight=teacher_weight if use_teacher else 0.0),
                                 [slide_path, *sorted(model_dir.glob("*.keras")), model_dir / "training_params.yaml",
                                  *([Path(teacher)] if use_teacher else [])])
    if reuse_or_guard(out_dir, fingerprint, overwrite, "prediction", done="prediction.json", record=".predict_params.json",
                      guard=False):  # a finished slide with the same settings: reuse it
        return PredictionResult(**read_prediction_info(out_dir))
    _check_out_dir(out_dir, overwrite)

    t_model = time.perf_counter()
    if runtime == "keras":
        model, params, model_classes = load_model_and_classes(model_dir)
        in_shape = model.input_shape
    else:  # the Keras model (and TensorFlow) only when the runtime needs it: no current ONNX export, or a fallback
        model = None
        params, model_classes = params_and_classes(model_dir)
        in_shape = keras_input_shape(params["model_file"])
    setup = {"setup_model": time.perf_counter() - t_model}
    cmap = check_class_map(model_classes, class_map)
    n_cls = cmap.n_classes
    if teach is not None:
        check_teacher(teach, n_cls, teacher)
    bg = background_index(cmap)
    tile = int(tile_size or params["tile_size"])

    def check_input(shape) -> None:
        if shape is not None and shape[1] is not None and shape[1] != tile:
            raise ParameterError(f"tile_size={tile} but the model in {model_dir} takes {shape[1]} px tiles; "
                                 "leave tile_size=None")

    def load_model():  # the runtime needs the Keras model after all
        loaded = load_model_and_classes(model_dir)[0]
        check_input(loaded.input_shape)
        return loaded

    check_input(in_shape)
    if tile < SIZE_MULTIPLE or tile % SIZE_MULTIPLE:
        raise ParameterError(f"tile_size must be a multiple of {SIZE_MULTIPLE} (the U-Net halves it five times); "
                             f"got {tile}")
    stride = tile // OVERLAP_STRIDE[overlap]
    weights = blend_weights(tile, blend)
    acc_rows = tile  # tiles of the next band in a batch wait aside (helpers.accumulate), not in a taller buffer
    model_mpp = float(params["mpp"])
    norm_path = resolve_normalizer(normalizer, model_dir, params)

    slide = open_slide(slide_path, mpp=mpp)
    probs_mm: RowStore | None = None
    # The runtime session (ONNX export check, OpenVINO compilation: ~0.3 s, mostly outside the GIL) is
    # built in a second thread while the tissue mask and the slide's stain estimate are computed. A stale
    # ONNX export is refreshed in the model folder even when the slide is then refused: it is the model's
    # cache, not a result of this slide.
    from concurrent.futures import ThreadPoolExecutor

    from helpers.runtime import make_predictor

    session_pool = ThreadPoolExecutor(1, thread_name_prefix="runtime-session")
    try:
        slide_mpp = slide.require_mpp()
        ds = slide.downsample_for(model_mpp)
        W, H = slide.size_at(ds)
        if W < tile or H < tile:
            raise SlideError(f"{slide_path}: {W}x{H} px at {model_mpp} um/px is smaller than one {tile} px tile; "
                             "use a smaller tile_size or a larger slide")
        t0 = time.perf_counter()
        session = session_pool.submit(make_predictor, model, model_dir, params["model_file"], runtime=runtime,
                                      batch_size=batch_size, tile=tile, n_cls=n_cls, load_model=load_model)
        mask_size = tissue_mask_size(W, H, tile)
        mask, mask_ds = slide_tissue_mask(slide, max_size=mask_size)
        xs, ys = grid_positions(W, tile, stride), grid_positions(H, tile, stride)
        tissue = tissue_tiles(mask, ds / mask_ds, xs, ys, tile, min_tissue)
        n_tissue = sum(len(r) for r in tissue)
        n_grid = len(xs) * len(ys)
        if n_tissue == 0:
            raise SlideError(f"{slide_path}: no tissue found (the slide looks like blank glass); check the slide "
                             "or its mpp")
        log.info("%s: %dx%d px at %.3g um/px (downsample %.3g), %d of %d tiles on tissue, tile %d stride %d",
                 slide.name, W, H, model_mpp, ds, n_tissue, n_grid, tile, stride)

        t1 = time.perf_counter()
        norm_fn = _slide_normalizer(norm_path, slide, tissue, ys, tile, ds)
        t2 = time.perf_counter()
        predict_fn = session.result()  # setup_session: only the wait left after the mask and the stain estimate
        if predict_fn.channels is not None:
            check_outputs(predict_fn.channels, model_classes, params, model_dir)
        setup.update(setup_tissue=t1 - t0, setup_normalizer=t2 - t1, setup_session=time.perf_counter() - t2)

        # ---- resumable state
        fp = _fingerprint(slide=file_id(slide_path), model=file_id(Path(params["model_file"])), ds=ds, tile=tile,
                          stride=stride, blend=blend, normalizer=str(norm_path) if norm_path else None,
                          batch=batch_size, n_cls=n_cls, mpp=slide_mpp, min_tissue=min_tissue,
                          runtime=predict_fn.runtime, acc_rows=acc_rows, mask_size=mask_size)
        part = out_dir / PARTIAL_DIR
        state = _load_state(part, fp)
        start_in_place(out_dir, fingerprint, done="prediction.json", record=".predict_params.json")  # inputs are good
        with resumable_or_nothing(part, covers=("acc.npy", "wsum.npy")):  # a full disk keeps a resumable state or nothing
            if state is None:
                shutil.rmtree(part, ignore_errors=True)
                make_dir(part)
                with disk_full_guard(part / "probabilities.npy"):
                    probs_mm = RowStore(part / "probabilities.npy", (H, W, n_cls), np.uint8, create=True)
                blender = BandAccumulator(W, n_cls, tile, weights, acc_rows)
                start_band, tiles_done, seconds_before = 0, 0, 0.0
            else:
                probs_mm = RowStore(part / "probabilities.npy")
                start_band, tiles_done, seconds_before = state["next_band"], state["tiles_done"], state["seconds"]
                blender = BandAccumulator(W, n_cls, tile, weights, acc_rows, top=ys[start_band] if start_band < len(ys) else H,
                                          acc=np.load(part / "acc.npy"), wsum=np.load(part / "wsum.npy"))
                log.info("%s: resuming at band %d of %d (%d tiles done)", slide.name, start_band, len(ys), tiles_done)

            from tqdm.auto import tqdm

            bar = tqdm(total=n_tissue, initial=tiles_done, unit="tile", desc=f"predict {slide.name}",
                       disable=not progress, smoothing=0.1)
            t_loop = time.perf_counter()
            tm = dict.fromkeys(("read", "normalize", "wait", "model", "blend", "write", "checkpoint"), 0.0)
            last_ckpt = time.perf_counter()
            tiles_now = 0
            pend_yx: list[tuple[int, int]] = []  # tiles waiting for a full model batch, across band ends
            pend_t: list[np.ndarray] = []

            def write_rows(row0: int, rows: np.ndarray) -> None:
                with disk_full_guard(part / "probabilities.npy"):
                    probs_mm.write(row0, rows)

            def finish_rows(unread: int) -> None:
                # rows above the oldest tile not yet run and above the first row an unread tile can
                # touch are final
                t0 = time.perf_counter()
                blender.advance(min(unread, pend_yx[0][0]) if pend_yx else unread, bg, write_rows)
                tm["write"] += time.perf_counter() - t0

            def run_batch(n: int) -> None:
                nonlocal tiles_now
                yx_b, tiles_b = pend_yx[:n], np.stack(pend_t[:n])
                del pend_yx[:n], pend_t[:n]
                t0 = time.perf_counter()
                probs = predict_fn(tiles_b)
                t1 = time.perf_counter()
                for (ty, tx), p in zip(yx_b, probs):
                    blender.add(ty, tx, p)
                tm["model"] += t1 - t0
                tm["blend"] += time.perf_counter() - t1
                tiles_now += n
                bar.update(n)

            try:
                t_mark = time.perf_counter()
                for b, y, row_x, batch, band_end in _prefetch(read_bands(slide, ys, tissue, tile, ds, norm_fn,
                                                                          start_band, timings=tm), prefetch):
                    tm["wait"] += time.perf_counter() - t_mark
                    pend_yx.extend((y, x) for x in row_x)
                    pend_t.extend(batch)
                    y_next = ys[b + 1] if b + 1 < len(ys) else H
                    unread = y_next if band_end else y  # the first row a tile not yet read can touch
                    while len(pend_yx) >= batch_size:
                        run_batch(batch_size)
                        finish_rows(unread)  # a batch across a band end: the next band's tiles wait aside briefly
                    if not band_end:
                        t_mark = time.perf_counter()
                        continue
                    checkpoint = b + 1 == len(ys) or time.perf_counter() - last_ckpt >= checkpoint_seconds
                    # a band's last tiles wait for the next band's to fill a batch, except at a checkpoint (the
                    # saved state holds no waiting tiles)
                    if pend_yx and checkpoint:
                        run_batch(len(pend_yx))
                    finish_rows(unread)
                    t1 = time.perf_counter()
                    if checkpoint:
                        elapsed = seconds_before + time.perf_counter() - t_loop
                        _save_state(part, fp, probs_mm, blender.acc, blender.wsum, b + 1, tiles_done + tiles_now, elapsed)
                        last_ckpt = time.perf_counter()
                    tm["checkpoint"] += time.perf_counter() - t1
                    _band_done(b)
                    t_mark = time.perf_counter()
            finally:
                bar.close()
        loop_seconds = time.perf_counter() - t_loop
        probs_mm.flush()
        blender = None  # the pyramid writer's buffers take their place, not add to them

        meta = {"slide": slide.name, "classes": cmap.names, "overlap": overlap, "blend": blend, "tile_size": tile}
        prob_path = out_dir / "probabilities.tiff"
        teacher_info = None
        if teach is not None:  # into a second row file: a run stopped here blends again from the U-Net's rows
            with disk_full_guard(part / "teacher.npy"):
                mixed = RowStore(part / "teacher.npy", probs_mm.shape, np.uint8, create=True)
                teacher_info = blend_teacher(probs_mm, mixed, slide, ds, model_mpp, teach, teacher_weight, bg,
                                             progress)
            probs_mm.close()
            probs_mm = mixed
        t_pyr = time.perf_counter()
        write_raster(prob_path, probs_mm, kind="probabilities", mpp=model_mpp, downsample=ds, meta=meta,
                     overwrite=True)
        seconds = time.perf_counter() - t_start + seconds_before
        tm = {"setup": t_loop - t_start, **setup, **tm, "loop": loop_seconds, "pyramid": time.perf_counter() - t_pyr}
        result = PredictionResult(
            slide=slide.name, slide_path=str(slide_path), out_dir=str(out_dir), probabilities=str(prob_path),
            width=W, height=H, downsample=ds, mpp=model_mpp, slide_mpp=slide_mpp, tile_size=tile, stride=stride,
            overlap=overlap, blend=blend, normalizer=str(norm_path) if norm_path else None,
            classes=cmap.to_dict()["classes"], tiles_grid=n_grid, tiles_tissue=n_tissue, seconds=round(seconds, 2),
            tiles_per_second=round(tiles_now / loop_seconds, 2) if loop_seconds > 0 and tiles_now else 0.0,
            resumed_from_band=start_band, model_file=str(params["model_file"]),
            extra={"slide_mpp_source": slide.mpp_source, "batch_size": batch_size, "runtime": predict_fn.runtime,
                   "runtime_reason": predict_fn.reason, "seconds_by_part": {k: round(v, 3) for k, v in tm.items()},
                   **({"teacher": {"file": str(teacher), **teacher_info}} if teacher_info else {})},
        )
        with disk_full_guard(out_dir / "prediction.json"):
            write_json(asdict(result), out_dir / "prediction.json", overwrite=True)
        probs_mm.close()
        shutil.rmtree(part, ignore_errors=True)
        log.info("%s: %d tiles in %.1f s (%.1f tiles/s)", slide.name, n_tissue, seconds, result.tiles_per_second)
        return result
    finally:
        session_pool.shutdown(wait=True)
        if probs_mm is not None:
            probs_mm.close()
        slide.close()


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
    with disk_full_guard(part):
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


# --------------------------------------------------------------------------- reading results


def probabilities_path(path: str | Path) -> Path:
    """``probabilities.tiff`` of a prediction folder (or the file itself); missing -> a one-line error."""
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

    arr = np.asarray(read_raster(probabilities_path(path)))
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
