"""QuPath GeoJSON: build features the way QuPath exports them, and write collections.

QuPath (0.4+) reads and writes GeoJSON ``FeatureCollection`` objects whose features
carry an ``id`` (UUID), ``geometry`` in level-0 pixel coordinates, and ``properties``
with ``objectType`` ("annotation" or "detection"), an optional ``name``,
``classification: {"name": ..., "color": [r, g, b]}`` and optional ``measurements``.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from helpers.io import write_json


def make_feature(geometry: Any, class_name: str | None, color: tuple[int, int, int] | list[int] | None,
                 object_type: str = "annotation", name: str | None = None,
                 measurements: dict[str, float] | None = None, feature_id: str | None = None) -> dict:
    """One QuPath GeoJSON feature.

    Args:
        geometry: a shapely geometry (Polygon/MultiPolygon) or a GeoJSON geometry dict,
            in level-0 pixel coordinates.
        class_name: QuPath classification name, or None for an unclassified object.
        color: RGB of the classification.
        object_type: "annotation" or "detection".
        name: optional object name shown in QuPath.
        measurements: optional ``{name: value}`` shown in QuPath's measurement table.
        feature_id: UUID string; a random one when None.
    """
    from shapely.geometry import mapping

    geom = geometry if isinstance(geometry, dict) else mapping(geometry)
    props: dict[str, Any] = {"objectType": object_type}
    if name:
        props["name"] = name
    if class_name is not None:
        props["classification"] = {"name": class_name, "color": [int(v) for v in (color or (255, 0, 0))]}
    if measurements:
        props["measurements"] = {k: float(v) for k, v in measurements.items()}
    return {"type": "Feature", "id": feature_id or str(uuid.uuid4()), "geometry": _plain(geom), "properties": props}


def _plain(obj: Any) -> Any:
    """Tuples -> lists, numpy scalars -> floats, so json output is plain GeoJSON."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item"):
        return obj.item()
    return obj


def write_feature_collection(features: list[dict], path: str | Path, overwrite: bool = False) -> Path:
    """Write features as a GeoJSON ``FeatureCollection`` (atomically)."""
    return write_json({"type": "FeatureCollection", "features": features}, path, overwrite=overwrite, indent=None)


def labels_to_features(labels: Any, class_map: Any, downsample: float = 1.0, probabilities: Any = None,
                       object_type: str = "annotation", mpp: float | None = None,
                       exclude: tuple[str, ...] | list[str] = ("Background",), min_area_px: int = 1,
                       simplify_tolerance: float | None = 0.25, connectivity: int = 4) -> list[dict]:
    """QuPath features from a label image: one per connected region per class, holes kept.

    Region outlines are traced by ``rasterio.features.shapes`` along pixel edges (pixel
    ``(col, row)`` covers ``[col, col + 1] x [row, row + 1]``, QuPath's convention), then
    scaled by ``downsample`` into full-resolution slide pixels, so rasterizing a feature
    back at ``downsample`` (pixel centres) gives the same pixels.

    Args:
        labels: ``(H, W)`` label image (``0`` unlabelled, ``1..N`` classes).
        class_map: :class:`helpers.config.ClassMap` giving names and colours.
        downsample: Level-0 slide pixels per label pixel.
        probabilities: Optional ``(H, W, N)`` class probabilities (0-1 or uint8 0-255);
            adds the region's mean probability of its class as a measurement.
        object_type: ``"annotation"`` or ``"detection"``.
        mpp: Level-0 um/px; adds ``Area µm^2`` (else ``Area px^2`` in level-0 pixels).
        exclude: Class names not exported (glass).
        min_area_px: Regions with fewer label pixels are skipped.
        simplify_tolerance: Douglas-Peucker tolerance in *label* pixels (keep it below 1
            so the outline stays within one model pixel); None/0 keeps every vertex.
        connectivity: 4 or 8 (pixel neighbourhood defining one region).

    Returns:
        GeoJSON feature dicts (see :func:`make_feature`), valid polygons or multipolygons.
    """
    import numpy as np
    from rasterio import features as rio_features
    from rasterio.transform import Affine
    from scipy import ndimage
    from shapely.geometry import MultiPolygon, Polygon, shape
    from shapely.validation import make_valid

    if object_type not in ("annotation", "detection"):
        raise ValueError(f"object_type must be 'annotation' or 'detection'; got {object_type!r}")
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D; got shape {labels.shape}")
    structure = np.ones((3, 3), bool) if connectivity == 8 else None
    probs = None
    if probabilities is not None:
        probs = np.asarray(probabilities)
        scale = 255.0 if probs.dtype == np.uint8 else 1.0
    feats: list[dict] = []
    transform = Affine(float(downsample), 0.0, 0.0, 0.0, float(downsample), 0.0)
    for cls in class_map.classes:
        if cls.name in exclude:
            continue
        mask = labels == cls.label
        if not mask.any():
            continue
        regions, n = ndimage.label(mask, structure=structure)
        sizes = np.bincount(regions.ravel(), minlength=n + 1)
        means = None
        if probs is not None:  # mean class probability per region, in bands of rows (bounded memory)
            total = np.zeros(n + 1, np.float64)
            for y in range(0, labels.shape[0], 1024):
                total += np.bincount(regions[y:y + 1024].ravel(), minlength=n + 1,
                                     weights=probs[y:y + 1024, :, cls.label - 1].ravel().astype(np.float32))
            means = total / np.maximum(sizes, 1) / scale
        geoms: dict[int, list] = {}
        for geom, value in rio_features.shapes(regions.astype(np.int32), mask=mask, connectivity=connectivity,
                                               transform=transform):
            geoms.setdefault(int(value), []).append(shape(geom))
        for rid in sorted(geoms):
            if sizes[rid] < min_area_px:
                continue
            parts = geoms[rid]
            geom = parts[0] if len(parts) == 1 else MultiPolygon(parts)
            if simplify_tolerance:
                geom = geom.simplify(simplify_tolerance * downsample, preserve_topology=True)
            if not geom.is_valid:
                geom = make_valid(geom)
            polys = [g for g in getattr(geom, "geoms", [geom]) if isinstance(g, (Polygon, MultiPolygon)) and not g.is_empty]
            if not polys:
                continue
            geom = polys[0] if len(polys) == 1 else MultiPolygon(
                [p for g in polys for p in getattr(g, "geoms", [g])])
            meas: dict[str, float] = {}
            if mpp:
                meas["Area µm^2"] = float(geom.area * mpp * mpp)
            else:
                meas["Area px^2"] = float(geom.area)
            if means is not None:
                meas[f"Mean {cls.name} probability"] = round(float(means[rid]), 4)
            feats.append(make_feature(geom, cls.name, cls.color,
                                      object_type=object_type, measurements=meas))
    return feats
