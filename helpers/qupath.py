"""QuPath GeoJSON: build features the way QuPath exports them, and write collections.

QuPath (0.4+) reads and writes GeoJSON ``FeatureCollection`` objects whose features
carry an ``id`` (UUID), ``geometry`` in level-0 pixel coordinates, and ``properties``
with ``objectType`` ("annotation" or "detection"), an optional ``name``,
``classification: {"name": ..., "color": [r, g, b]}`` and optional ``measurements``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from helpers.io import atomic_path, write_json

#: QuPath 0.6+ rounds the coordinates it imports to 1/100 px (measured with QuPath 0.7.0's
#: reader; 0.5 keeps float32): :func:`make_feature` writes them on this grid.
COORDINATE_GRID = 0.01


def make_feature(geometry: Any, class_name: str | None, color: tuple[int, int, int] | list[int] | None,
                 object_type: str = "annotation", name: str | None = None,
                 measurements: dict[str, float] | None = None, feature_id: str | None = None) -> dict:
    """One QuPath GeoJSON feature.

    An invalid polygon (e.g. self-intersecting) is repaired with ``shapely.make_valid``
    (its polygonal parts kept): QuPath 0.5 silently splits such a polygon and QuPath 0.6+
    rejects the *whole file* for one of them. Coordinates are then put on QuPath's grid
    of :data:`COORDINATE_GRID` px (``shapely.set_precision``, which keeps the geometry
    valid): QuPath 0.7 rounds imported coordinates to it, so it reads what is written.

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
    from shapely.geometry import mapping, shape

    geom = shape(geometry) if isinstance(geometry, dict) else geometry
    if not geom.is_valid:
        geom = _repair(geom)
    geom = mapping(_on_grid(geom))
    props = _properties(class_name, color, object_type, name, measurements)
    return {"type": "Feature", "id": feature_id or str(uuid.uuid4()), "geometry": _plain(geom), "properties": props}


def _properties(class_name: str | None, color: Any, object_type: str, name: str | None,
                measurements: dict[str, float] | None) -> dict[str, Any]:
    props: dict[str, Any] = {"objectType": object_type}
    if name:
        props["name"] = name
    if class_name is not None:
        props["classification"] = {"name": class_name, "color": [int(v) for v in (color or (255, 0, 0))]}
    if measurements:
        props["measurements"] = {k: float(v) for k, v in measurements.items()}
    return props


class StreamedFeature:
    """A feature whose polygon is written from disk (:class:`helpers.outlines.StreamedPolygon`), never held whole.

    :func:`write_features_stream` writes it as it comes; :meth:`to_dict` gives the plain feature.
    """

    def __init__(self, polygon: Any, properties: dict[str, Any], feature_id: str | None = None) -> None:
        self.polygon, self.properties, self.id = polygon, properties, feature_id or str(uuid.uuid4())

    def write(self, out: Any) -> None:
        """Write the feature's JSON to the text stream ``out``."""
        out.write(f'{{"type": "Feature", "id": {json.dumps(self.id)}, "geometry": ')
        self.polygon.write(out)
        out.write(f', "properties": {json.dumps(self.properties)}}}')

    def to_dict(self) -> dict:
        import io

        buf = io.StringIO()
        self.write(buf)
        return json.loads(buf.getvalue())


def _on_grid(geom: Any) -> Any:
    """``geom`` with coordinates on QuPath's :data:`COORDINATE_GRID` (valid; ValueError if nothing is left)."""
    from shapely import set_precision

    out = set_precision(geom, COORDINATE_GRID)
    if out.is_empty and not geom.is_empty:
        raise ValueError(f"{geom.geom_type} smaller than QuPath's {COORDINATE_GRID} px coordinate grid; "
                         "QuPath cannot import it")
    return out


def _repair(geom: Any) -> Any:
    """The polygonal part of ``shapely.make_valid(geom)``; ValueError when it has none."""
    from shapely.geometry import MultiPolygon, Polygon
    from shapely.validation import make_valid

    fixed = make_valid(geom)
    polys = [p for g in getattr(fixed, "geoms", [fixed]) if isinstance(g, (Polygon, MultiPolygon))
             for p in getattr(g, "geoms", [g]) if not p.is_empty]
    if not polys:
        raise ValueError(f"invalid geometry without area after repair ({geom.geom_type}, {fixed.geom_type}); "
                         "QuPath cannot import it as a region")
    return polys[0] if len(polys) == 1 else MultiPolygon(polys)


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


def write_features_stream(features: Iterable[dict], path: str | Path, overwrite: bool = False) -> int:
    """Write GeoJSON features to a ``FeatureCollection`` file as they come (atomically).

    The same JSON as :func:`write_feature_collection`, without holding the
    list: a whole-slide export has one feature per region; a :class:`StreamedFeature` is
    copied from its spool file, not built in memory. Returns the number written.
    """
    n = 0
    with atomic_path(path, overwrite) as tmp, open(tmp, "w") as fh:
        fh.write('{"type": "FeatureCollection", "features": [')
        for feat in features:
            fh.write(", " if n else "")
            if isinstance(feat, StreamedFeature):
                feat.write(fh)
            else:
                fh.write(json.dumps(feat))
            n += 1
        fh.write("]}")
    return n


def _excluded_names(class_map: Any, exclude: tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """Class names not exported: ``exclude``, or by default the map's background (glass) class."""
    if exclude is not None:
        return tuple(exclude)
    from helpers.errors import ClassMapError

    try:
        return (class_map.background.name,)
    except (ClassMapError, AttributeError):
        return ()


def labels_to_features(labels: Any, class_map: Any, downsample: float = 1.0, probabilities: Any = None,
                       object_type: str = "annotation", mpp: float | None = None,
                       exclude: tuple[str, ...] | list[str] | None = None, min_area_px: int = 1,
                       simplify_tolerance: float | None = 0.25, connectivity: int = 4,
                       band_rows: int | None = None) -> list[dict]:
    """QuPath features from a label image: one per connected region per class, holes kept.

    Region outlines are traced by ``rasterio.features.shapes`` along pixel edges (pixel
    ``(col, row)`` covers ``[col, col + 1] x [row, row + 1]``, QuPath's convention), then
    scaled by ``downsample`` into full-resolution slide pixels, so rasterizing a feature
    back at ``downsample`` (:func:`helpers.annotations.rasterize`, QuPath's pixel rule) gives the same pixels.

    With ``band_rows`` the image is traced ``band_rows`` rows at a time (memory bounded by
    a band, not the image): regions are labelled per band, pieces that meet across a band
    seam are joined (union-find on the seam rows, with the same 4/8 neighbourhood), and
    their outlines merged with ``shapely.unary_union``; pixel counts and probability sums
    add up, so regions, areas and means are those of the whole-image tracing (only vertex
    order and the order of features may differ).

    Args:
        labels: ``(H, W)`` label image (``0`` unlabelled, ``1..N`` classes); with
            ``band_rows`` anything sliceable by rows (a memmap, :class:`helpers.rowstore.RowStore`).
        class_map: :class:`helpers.config.ClassMap` giving names and colours.
        downsample: Level-0 slide pixels per label pixel.
        probabilities: Optional ``(H, W, N)`` class probabilities (0-1 or uint8 0-255);
            adds the region's mean probability of its class as a measurement. Read in bands
            of rows, so a row-sliceable array on disk is fine.
        object_type: ``"annotation"`` or ``"detection"``.
        mpp: Level-0 um/px; adds ``Area µm^2`` (else ``Area px^2`` in level-0 pixels).
        exclude: Class names not exported; None: the class map's background (glass) class.
        min_area_px: Regions with fewer label pixels are skipped.
        simplify_tolerance: Douglas-Peucker tolerance in *label* pixels (keep it below 1
            so the outline stays within one model pixel); None/0 keeps every vertex.
        connectivity: 4 or 8 (pixel neighbourhood defining one region).
        band_rows: Trace in bands of this many rows (None = the whole image at once).

    Returns:
        GeoJSON feature dicts (see :func:`make_feature`), valid polygons or multipolygons.
    """
    import numpy as np

    if object_type not in ("annotation", "detection"):
        raise ValueError(f"object_type must be 'annotation' or 'detection'; got {object_type!r}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8; got {connectivity}")
    if band_rows is None:
        labels = np.asarray(labels)
    if len(labels.shape) != 2:
        raise ValueError(f"labels must be 2-D; got shape {labels.shape}")
    height = labels.shape[0]
    rows = int(band_rows) if band_rows else height
    if rows < 1:
        raise ValueError(f"band_rows must be >= 1; got {band_rows}")
    feats: list[tuple[int, tuple[int, int], dict]] = []
    exclude = _excluded_names(class_map, exclude)
    for ci, key, feat in _iter_features(labels, class_map, downsample, probabilities, object_type, mpp, exclude,
                                        min_area_px, simplify_tolerance, connectivity, rows):
        feats.append((ci, key, feat if isinstance(feat, dict) else feat.to_dict()))
    feats.sort(key=lambda t: (t[0], t[1]))  # class order, then raster order of first pixels
    return [f for _, _, f in feats]


def iter_label_features(labels: Any, class_map: Any, downsample: float = 1.0, probabilities: Any = None,
                        object_type: str = "annotation", mpp: float | None = None,
                        exclude: tuple[str, ...] | list[str] | None = None, min_area_px: int = 1,
                        simplify_tolerance: float | None = 0.25, connectivity: int = 4,
                        band_rows: int = 256, streamed: bool = False,
                        spool_dir: str | Path | None = None) -> Iterator[dict | StreamedFeature]:
    """:func:`labels_to_features` as a stream, traced in bands of rows: each feature is
    yielded as soon as its region is complete, so neither the label image nor the list of
    features is held (write them out as they come). Order: by class, then by where the
    region ends (not its first pixel).

    A region crossing band seams is assembled without being held whole
    (:mod:`helpers.outlines`, 4-connectivity): its holes go to a spool file in
    ``spool_dir`` (default: the system's temporary folder) as they are found. With
    ``streamed`` such a region is yielded as a :class:`StreamedFeature` (write it with
    :func:`write_features_stream` before taking the next feature); otherwise as a dict."""
    if object_type not in ("annotation", "detection"):
        raise ValueError(f"object_type must be 'annotation' or 'detection'; got {object_type!r}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8; got {connectivity}")
    if len(labels.shape) != 2:
        raise ValueError(f"labels must be 2-D; got shape {labels.shape}")
    if band_rows < 1:
        raise ValueError(f"band_rows must be >= 1; got {band_rows}")
    exclude = _excluded_names(class_map, exclude)
    for _, _, feat in _iter_features(labels, class_map, downsample, probabilities, object_type, mpp, exclude,
                                     min_area_px, simplify_tolerance, connectivity, int(band_rows), spool_dir):
        yield feat if streamed or isinstance(feat, dict) else feat.to_dict()


def _iter_features(labels: Any, class_map: Any, downsample: float, probabilities: Any, object_type: str,
                   mpp: float | None, exclude: Any, min_area_px: int, simplify_tolerance: float | None,
                   connectivity: int, rows: int, spool_dir: str | Path | None = None
                   ) -> Iterator[tuple[int, tuple[int, int], dict | StreamedFeature]]:
    import numpy as np

    from helpers.outlines import Context, Spool, StreamedPolygon

    scale = 1.0
    if probabilities is not None:
        scale = 255.0 if probabilities.dtype == np.uint8 else 1.0
    ctx = Context(Spool(spool_dir), simplify_tolerance, float(downsample), COORDINATE_GRID)
    try:
        for ci, cls in enumerate(class_map.classes):
            if cls.name in exclude:
                continue
            for key, geom, count, psum in _class_regions(labels, probabilities, cls.label, connectivity, rows, ctx):
                if count < min_area_px:
                    continue
                mean = None if probabilities is None else psum / max(count, 1) / scale
                if isinstance(geom, StreamedPolygon):
                    props = _properties(cls.name, cls.color, object_type, None, _measures(geom.area, mpp, mean, cls))
                    yield ci, key, StreamedFeature(geom, props)
                    continue
                feat = _region_feature(geom, cls, downsample, simplify_tolerance, mpp, mean, object_type)
                if feat is not None:
                    yield ci, key, feat
    finally:
        ctx.spool.close()


def _class_regions(labels: Any, probs: Any, label: int, connectivity: int, band_rows: int,
                   ctx: Any) -> Iterator[tuple[tuple[int, int], Any, int, float]]:
    """``(order key, geometry, pixel count, probability sum)`` of each connected region of one class.

    Traced band by band (in label px, scaled to level-0 px on output); a region is yielded
    as soon as the band below no longer touches it, so only regions crossing the current
    seam are held, each as a :class:`helpers.outlines.RegionAssembly` (its exterior; its
    holes are spooled): the geometry is then a :class:`helpers.outlines.StreamedPolygon`.
    With 8-connectivity (pieces may meet at a corner only) or a simplification tolerance
    above :data:`helpers.outlines.MAX_RING_TOLERANCE` (or a downsample below 0.1, where
    rounding to QuPath's 0.01 px grid is no longer far below the gap between rings) they
    are held whole (:class:`helpers.outlines.HeldRegion`). The order key ``(first band's y, region id
    there)`` sorts regions into raster order of their first pixels.
    """
    import numpy as np
    from rasterio import features as rio_features
    from rasterio.transform import Affine
    from scipy import ndimage
    from shapely.geometry import shape

    from helpers.outlines import MAX_RING_TOLERANCE, HeldRegion, RegionAssembly, join, pinch_keys, scaled

    stream = connectivity == 4 and (ctx.tolerance or 0) <= MAX_RING_TOLERANCE and ctx.downsample >= 0.1
    region_cls = RegionAssembly if stream else HeldRegion
    structure = np.ones((3, 3), bool) if connectivity == 8 else None
    height = labels.shape[0]
    pieces: dict[int, Any] = {}  # active regions (crossing the current seam) by their union-find root
    parent: dict[int, int] = {}

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    prev_last: np.ndarray | None = None  # global ids on the previous band's last row
    next_gid = 1
    for y0 in range(0, height, band_rows):
        y1 = min(height, y0 + band_rows)
        top, bottom = int(y0 > 0), int(y1 < height)
        ext = np.asarray(labels[y0 - top:y1 + bottom]) == label  # one row of context either side
        mask = ext[top:top + y1 - y0]
        active: set[int] = set()
        if mask.any():
            regions, n = ndimage.label(mask, structure=structure)
            sums = np.zeros(n + 1, np.float64)
            if probs is not None:
                for r in range(0, y1 - y0, 256):
                    band = np.asarray(probs[y0 + r:min(y1, y0 + r + 256), :, label - 1], np.float64)  # bincount sums in float64
                    sums += np.bincount(regions[r:r + 256].ravel(), minlength=n + 1, weights=band.ravel())
            seam_ids = set()
            if y0 > 0:
                seam_ids.update(int(v) for v in np.unique(regions[0]) if v)
            if y1 < height:
                seam_ids.update(int(v) for v in np.unique(regions[-1]) if v)
            gid = {rid: next_gid + i for i, rid in enumerate(sorted(seam_ids))}
            next_gid += len(gid)
            lut = np.zeros(n + 1, np.int64)
            for rid, g in gid.items():
                lut[rid] = g
            if gid and stream:
                ctx.pins = pinch_keys(np.pad(ext, ((1 - top, 1 - bottom), (0, 0))), y0)
            geoms: dict[int, list] = {}
            transform = Affine(1.0, 0.0, 0.0, 0.0, 1.0, float(y0))
            sizes: dict[int, float] = {}  # pixel counts: the traced polygons' areas are exact (unit pixels)
            for g, value in rio_features.shapes(regions, mask=mask, connectivity=connectivity, transform=transform):
                poly = shape(g)
                geoms.setdefault(int(value), []).append(poly)
                sizes[int(value)] = sizes.get(int(value), 0.0) + poly.area
            for rid in sorted(geoms):
                parts = geoms.pop(rid)
                if rid in gid:
                    pieces[gid[rid]] = region_cls.from_piece(parts, (y0, rid), round(sizes[rid]), float(sums[rid]),
                                                             gid[rid], ctx)
                    parent[gid[rid]] = gid[rid]
                else:
                    yield (y0, rid), scaled(join(parts), ctx.downsample), round(sizes[rid]), float(sums[rid])
            # join pieces across the seam with the previous band
            if prev_last is not None and y0 > 0:
                first = lut[regions[0]]
                for s in ((0,) if connectivity == 4 else (-1, 0, 1)):
                    a = prev_last[max(0, s):len(prev_last) + min(0, s)]
                    b = first[max(0, -s):len(first) + min(0, -s)]
                    both = (a > 0) & (b > 0)
                    for ga, gb in set(zip(a[both].tolist(), b[both].tolist())):
                        ra, rb = find(ga), find(gb)
                        if ra != rb:
                            parent[max(ra, rb)] = min(ra, rb)
            prev_last = lut[regions[-1]] if y1 < height else None
            if prev_last is not None:
                active = {find(int(g)) for g in np.unique(prev_last) if g}
            del regions, mask, ext
        else:
            prev_last = None
        groups: dict[int, list[int]] = {}  # pieces joined this band become one region under their root
        for g in pieces:
            groups.setdefault(find(g), []).append(g)
        for root, members in groups.items():
            if len(members) > 1:
                pieces[root].absorb([pieces.pop(m) for m in members if m != root], ctx)
        for root in [r for r in pieces if r not in active]:  # regions that cannot grow into the next band
            region = pieces.pop(root)
            for m in region.gids:
                parent.pop(m, None)
            yield region.key, region.finish(ctx), region.count, region.psum


def _measures(area_px: float, mpp: float | None, mean: float | None, cls: Any) -> dict[str, float]:
    """Area (um^2 with ``mpp``, else level-0 px^2) and the mean probability of the region's class."""
    meas = {"Area µm^2": float(area_px * mpp * mpp)} if mpp else {"Area px^2": float(area_px)}
    if mean is not None:
        meas[f"Mean {cls.name} probability"] = round(float(mean), 4)
    return meas


def _region_feature(geom: Any, cls: Any, downsample: float, simplify_tolerance: float | None, mpp: float | None,
                    mean: float | None, object_type: str) -> dict | None:
    """One region's feature: simplified, made valid, with area (and mean probability) measurements."""
    from shapely.geometry import MultiPolygon, Polygon
    from shapely.validation import make_valid

    if simplify_tolerance:
        geom = geom.simplify(simplify_tolerance * downsample, preserve_topology=True)
    if not geom.is_valid:
        geom = make_valid(geom)
    polys = [g for g in getattr(geom, "geoms", [geom]) if isinstance(g, (Polygon, MultiPolygon)) and not g.is_empty]
    if not polys:
        return None
    geom = polys[0] if len(polys) == 1 else MultiPolygon([p for g in polys for p in getattr(g, "geoms", [g])])
    return make_feature(geom, cls.name, cls.color, object_type=object_type,
                        measurements=_measures(geom.area, mpp, mean, cls))
