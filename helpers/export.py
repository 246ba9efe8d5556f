"""Prediction export (07, step 2): ``probabilities.tiff`` -> labels, QuPath GeoJSON, overlay, summary.

:func:`export_prediction` post-processes the stored probabilities (:mod:`helpers.postprocess`),
writes ``labels.tiff``, ``<slide>.geojson`` (:mod:`helpers.qupath`), ``overlay.png`` and
``summary.json``, then the folder's done marker (:func:`helpers.steps.mark_done`, last).
Post-processing variants can be tried without predicting again.

Memory: the probability TIFF is decoded once, in bands of rows (:class:`helpers.rasters.RasterRows`),
into a row file in the export's scratch folder (disk and page cache: as large as the raster's
probabilities uncompressed, like predict_slide's own row file, and removed at the end), which
post-processing and the region means then read; labels go to row files on disk too
(:class:`helpers.rowstore.RowStore`) and GeoJSON regions are
traced band by band, joined across seams; hole filling and small-object removal find
connected components band by band too (:mod:`helpers.components`). A region crossing
band seams (e.g. one spanning the slide) is not held whole either: its holes are
written to a spool file in the scratch folder as they are found, only its exterior
above the current seam is kept (:mod:`helpers.outlines`).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from helpers.config import ClassMap
from helpers.errors import HistoUNetError
from helpers.io import read_json, write_json
from helpers.model import background_index, check_class_map, class_map_from_params, headline_index
from helpers.predict import probabilities_path, read_prediction_info
from helpers.rowstore import RasterRows, RowStore, disk_full_guard, write_raster
from helpers.steps import DONE, fingerprint_of, guard_output, mark_done, reuse_or_guard

log = logging.getLogger(__name__)

EXPORT_BAND_ROWS = 256



def export_prediction(pred_dir: str | Path, *, class_map: ClassMap | str | Path | None = None,
                      smoothing: str | None = "gaussian", smoothing_size: float = 2.0, opening_px: int = 0,
                      closing_px: int = 0, fill_holes_um2: float | None = None, min_area_um2: float | None = 0.0,
                      object_type: str = "annotation", exclude_classes: tuple[str, ...] | None = None,
                      overwrite: bool = False, thumbnail_size: int = 1024) -> dict:
    """Post-process stored probabilities and write labels, GeoJSON, overlay and summary.

    Args:
        pred_dir: Folder written by :func:`helpers.predict.predict_slide`.
        class_map: Class map (default: the model's, stored in ``prediction.json``).
        smoothing, smoothing_size, opening_px, closing_px, fill_holes_um2, min_area_um2:
            See :func:`helpers.postprocess.postprocess`.
        object_type: ``"annotation"`` or ``"detection"`` for the QuPath objects.
        exclude_classes: Classes not exported to GeoJSON; None: the map's background (glass) class.
        overwrite: Replace earlier labels/GeoJSON/summary.
        thumbnail_size: Longer side of ``overlay.png``'s slide thumbnail.

    Returns:
        The summary dict (also ``summary.json``; the folder's ``manifest.csv`` is written last).
    """
    from helpers import postprocess as pp
    from helpers.pretrained import read_start_record
    from helpers.qupath import iter_label_features, write_features_stream
    from helpers.slides import open_slide
    from helpers.viz import overlay_picture, save_png

    pred_dir = Path(pred_dir)
    info = read_prediction_info(pred_dir)
    model_cmap = class_map_from_params(info["classes"], str(pred_dir / "prediction.json"))
    cmap = check_class_map(model_cmap, class_map)
    slide_name = info["slide"]
    outputs = {"labels": pred_dir / "labels.tiff", "geojson": pred_dir / f"{slide_name}.geojson",
               "overlay": pred_dir / "overlay.png", "summary": pred_dir / "summary.json"}
    fingerprint = fingerprint_of(dict(classes=cmap.names, smoothing=smoothing, smoothing_size=smoothing_size,
                                      opening_px=opening_px, closing_px=closing_px, fill_holes_um2=fill_holes_um2,
                                      min_area_um2=min_area_um2, object_type=object_type, exclude_classes=exclude_classes,
                                      thumbnail_size=thumbnail_size), [probabilities_path(pred_dir)])
    if reuse_or_guard(pred_dir, fingerprint, overwrite, "export", record=".export_params.json", in_place=True,
                      guard=False):  # exported the same way before: reuse it
        return read_json(outputs["summary"])
    for p in outputs.values():
        guard_output(p, overwrite)
    if overwrite:  # the done markers go first: a failed export must not look finished
        for marker in (outputs["summary"], pred_dir / DONE):
            with contextlib.suppress(FileNotFoundError):
                marker.unlink()
    t0 = time.perf_counter()
    # Bounded memory: the probability TIFF is decoded once, band by band, into a row file in the
    # scratch folder (page cache, not this process's memory; the size of predict_slide's own row
    # file), which post-processing (with its halo rows) and the region means of every class then
    # read without decoding again; labels go to row files too.
    tiff_rows = RasterRows(probabilities_path(pred_dir))
    if tiff_rows.ndim == 2:
        raise HistoUNetError(f"{probabilities_path(pred_dir)}: one channel only; run predict_slide again")
    ds, mpp = float(info["downsample"]), float(info["mpp"])
    H, W = tiff_rows.shape[:2]
    with disk_full_guard(pred_dir), tempfile.TemporaryDirectory(prefix=".export.", dir=pred_dir) as scratch_dir:
        probs = RowStore(Path(scratch_dir) / "probabilities.npy", tiff_rows.shape, tiff_rows.dtype, create=True)
        out_store = RowStore(Path(scratch_dir) / "labels.npy", (H, W), np.uint8, create=True)
        areas = bool(fill_holes_um2 or min_area_um2)  # area filters work band by band between row stores
        tmp_store = RowStore(Path(scratch_dir) / "smoothed.npy", (H, W), np.uint8, create=True) \
            if (opening_px or closing_px or areas) else None
        extra_store = RowStore(Path(scratch_dir) / "areas.npy", (H, W), np.uint8, create=True) if areas else None
        try:
            for y in range(0, H, EXPORT_BAND_ROWS):  # bands as small as post-processing's: no extra peak memory
                probs.write(y, tiff_rows.read(y, y + EXPORT_BAND_ROWS))
            labels, _ = pp.postprocess_labels(probs, mpp=info["mpp"], smoothing=smoothing,
                                              smoothing_size=smoothing_size, opening_px=opening_px,
                                              closing_px=closing_px, fill_holes_um2=fill_holes_um2,
                                              min_area_um2=min_area_um2, background_label=background_index(cmap) + 1,
                                              band_rows=EXPORT_BAND_ROWS, out=out_store, scratch=tmp_store,
                                              extra=extra_store)
            for st in (tmp_store, extra_store):
                if st is not None:
                    st.close()
            meta = {"slide": slide_name, "classes": cmap.names}
            parts = {"labels": time.perf_counter() - t0}  # post-processing (+ labels.tiff, below)
            # labels.tiff is written in a second thread while the GeoJSON is traced: both only read
            # the finished labels, and their compression / tracing release the GIL (2 cores busy)
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(1) as pool:
                tiff = pool.submit(write_raster, outputs["labels"], labels, kind="labels", mpp=mpp, downsample=ds,
                                   meta=meta, overwrite=True)
                t1 = time.perf_counter()
                features = iter_label_features(labels, cmap, ds, probabilities=probs, object_type=object_type,
                                               mpp=info["slide_mpp"], exclude=exclude_classes,
                                               band_rows=EXPORT_BAND_ROWS, streamed=True, spool_dir=scratch_dir)
                with disk_full_guard(outputs["geojson"]):
                    n_features = write_features_stream(features, outputs["geojson"], overwrite=True)
                parts["geojson"] = time.perf_counter() - t1
                tiff.result()  # its errors (e.g. a full disk) surface here
            parts["labels"] += time.perf_counter() - t1 - parts["geojson"]  # waiting for labels.tiff after the GeoJSON
            t1 = time.perf_counter()
            summary = summarize(labels, cmap, mpp)
            parts["summary"] = time.perf_counter() - t1
        finally:
            probs.close()
            out_store.close()
            for st in (tmp_store, extra_store):
                if st is not None:
                    st.close()

    from helpers.rasters import read_raster

    t1 = time.perf_counter()
    with open_slide(info["slide_path"], mpp=info["slide_mpp"]) as slide:
        thumb, tds = slide.thumbnail(thumbnail_size)
    small = np.asarray(read_raster(outputs["labels"], downsample=tds))  # the pyramid's low level, not the image
    bg_label = cmap.classes[background_index(cmap)].label  # glass is left clear
    picture = overlay_picture(thumb, small, cmap, title=f"{slide_name}: predicted classes", hidden=(bg_label,))
    with disk_full_guard(outputs["overlay"]):
        save_png(picture, outputs["overlay"], overwrite=True)
    parts["overlay"] = time.perf_counter() - t1
    t1 = time.perf_counter()
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
    parts["summary"] += time.perf_counter() - t1
    summary["seconds_by_part"] = {k: round(v, 3) for k, v in parts.items()}
    with disk_full_guard(outputs["summary"]):
        write_json(summary, outputs["summary"], overwrite=True)
        mark_done(pred_dir)
    return summary


def summarize(labels: np.ndarray, cmap: ClassMap, mpp: float) -> dict:
    """Areas per class in mm^2 and the headline class's (tumour's) fraction of the tissue (non-background) area."""
    import cv2

    counts = np.zeros(256, np.int64)
    rows = max(1, 2**23 // max(1, labels.shape[1]))  # bands under 2**24 px: calcHist counts in float32, exact below
    for y in range(0, labels.shape[0], rows):  # a uint8 histogram (np.bincount would copy the band as int64)
        band = np.ascontiguousarray(labels[y:y + rows], np.uint8)
        counts += cv2.calcHist([band], [0], None, [256], [0, 256]).ravel().round().astype(np.int64)
    px_mm2 = (mpp / 1000.0) ** 2
    areas = {c.name: round(float(counts[c.label] * px_mm2), 6) for c in cmap.classes}
    bg = cmap.classes[background_index(cmap)].name
    tissue = sum(v for k, v in areas.items() if k != bg)
    head = headline_index(cmap)
    tumour = cmap.classes[head].name if head is not None else None
    frac = areas[tumour] / tissue if tumour and tissue > 0 else 0.0
    return {"areas_mm2": areas, "tissue_mm2": round(tissue, 6), "tumour_fraction": round(frac, 4)}
