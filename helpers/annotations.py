"""Read QuPath GeoJSON annotations and rasterize them into label images.

Coordinates are level-0 (full-resolution) pixels, as QuPath exports them. A label
image covers a region ``(x, y)`` of ``width x height`` output pixels at ``downsample``
(level-0 pixels per output pixel). Holes and MultiPolygons are honoured.

Pixel rule: QuPath's. QuPath's ``LabeledImageServer`` (Java2D) labels an output pixel
when its *top-left corner* lies inside a polygon, not its centre; :func:`rasterize`
does the same (``rasterio.features.rasterize`` with the grid shifted by half a pixel,
less :data:`CORNER_OFFSET` so that a corner lying on a polygon's left or top edge counts
as inside, as in Java2D). So label tiles of the Python route and of
``groovy/export_tiles.groovy`` agree except for a few pixels whose corner lies within
about 0.01 px of an annotation's edge (``tests/test_qupath_groovy.py`` measures it), and
outlines traced along pixel edges (:func:`helpers.qupath.labels_to_features`)
rasterize back to exactly their pixels.

Rules (documented decisions):

* **Class** of a feature: ``properties.classification.name``. A feature without a
  classification (e.g. QuPath 0.5 exports objects that have only ``name`` and
  ``color``) takes its ``name`` when that name is a class of the class map;
  otherwise the ``unclassified`` policy applies: ``"skip"`` (default, with one
  warning counting them), ``"error"``, or a class name to give them.
* **Suggestions** of step 09 (unclassified features named ``"Review <n>"``) are never
  labels: they are skipped whatever the ``unclassified`` policy.
* **Unknown class names** (classified, but not in the class map) are an error that
  lists them and the known classes.
* **Overlaps**: where annotations of different classes overlap, the *smaller*
  annotation wins (it is drawn last), so a tumour nest drawn inside a large stroma
  region keeps its label. (QuPath's LabeledImageServer instead paints class by class,
  the class added last winning; ``groovy/export_tiles.groovy`` adds Tumor last, so
  both routes agree for nests drawn inside larger regions.)
* **Invalid polygons** (self-intersections) are repaired with ``shapely.make_valid``
  and a warning says so; non-area geometries (points, lines) are skipped.
* **Outside the slide**: parts outside the slide are clipped; annotations entirely
  outside are dropped with a warning, and an error is raised if none is left.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from helpers.config import ClassMap
from helpers.errors import AnnotationError, ClassMapError, ParameterError

log = logging.getLogger(__name__)

#: Where :func:`rasterize` samples an output pixel: this many *level-0* pixels right of
#: and below its top-left corner (QuPath's rule). Twice the 0.005 px by which QuPath 0.7
#: (and :func:`helpers.qupath.make_feature`) round coordinates to their 0.01 px grid, so
#: outlines traced along pixel edges still rasterize back to exactly their pixels.
CORNER_OFFSET = 0.01

#: Name prefix of step 09's suggestions ("Review 3"); unclassified ones are never labels.
SUGGESTION_PREFIX = "Review"


def is_suggestion(name: str, classified: bool) -> bool:
    """True for an unclassified feature named like a step-09 suggestion (``"Review <n>"``)."""
    head, _, rank = name.strip().partition(" ")
    return not classified and head == SUGGESTION_PREFIX and rank.strip().isdigit()


@dataclass
class Annotation:
    """One polygonal annotation: shapely geometry in level-0 pixels and its class.

    Attributes:
        geometry: shapely Polygon or MultiPolygon (level-0 pixel coordinates).
        class_name: class of the class map.
        label: label value of ``class_name`` (1..N).
        name: QuPath object name ("" if none).
        id: QuPath object id ("" if none).
    """

    geometry: Any
    class_name: str
    label: int
    name: str = ""
    id: str = ""


def _polygonal(geom: Any) -> Any:
    """The polygonal part of a geometry (Polygon/MultiPolygon) or None."""
    from shapely.geometry import GeometryCollection, MultiPolygon, Polygon

    if isinstance(geom, (Polygon, MultiPolygon)):
        return None if geom.is_empty else geom
    if isinstance(geom, GeometryCollection):
        polys: list = []
        for g in geom.geoms:
            p = _polygonal(g)
            if p is not None:
                polys.extend(p.geoms if isinstance(p, MultiPolygon) else [p])
        if not polys:
            return None
        return polys[0] if len(polys) == 1 else MultiPolygon(polys)
    return None


def _load_features(path: Path) -> list[dict]:
    if not path.is_file():
        raise AnnotationError(f"{path}: annotation file not found; export it from QuPath (File > Export objects as GeoJSON)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: not a GeoJSON file (JSON error: {str(exc).splitlines()[0]}); "
                              "export annotations from QuPath as GeoJSON") from None
    if isinstance(data, list):  # QuPath can export a bare list of features
        feats = data
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        feats = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        feats = [data]
    else:
        raise AnnotationError(f"{path}: not GeoJSON (expected a FeatureCollection, a Feature or a list of features); "
                              "export annotations from QuPath as GeoJSON")
    if not isinstance(feats, list) or not all(isinstance(f, dict) and "geometry" in f for f in feats):
        raise AnnotationError(f"{path}: not GeoJSON (features without 'geometry'); export annotations from QuPath as GeoJSON")
    return feats


def read_annotations(path: str | Path, class_map: ClassMap, slide_size: tuple[int, int] | None = None,
                     unclassified: str = "skip", object_types: Sequence[str] = ("annotation",),
                     allow_empty: bool = False) -> list[Annotation]:
    """Read the polygonal annotations of a QuPath GeoJSON export.

    Args:
        path: GeoJSON file (FeatureCollection, Feature, or list of features).
        class_map: Classes; their names are matched case-sensitively, as in QuPath.
        slide_size: ``(width, height)`` of the slide in level-0 pixels; when given,
            annotations are clipped to the slide and those entirely outside dropped.
        unclassified: What to do with features without a classification whose name is
            not a class: ``"skip"`` (warn), ``"error"``, or a class name to assign.
        object_types: QuPath ``objectType`` values to keep (features without one are kept).
        allow_empty: Return ``[]`` instead of raising when no usable annotation is left.

    Returns:
        Annotations sorted by decreasing area (the order in which :func:`rasterize`
        draws them, so smaller ones end on top).

    Raises:
        AnnotationError: not GeoJSON, no annotations, all outside the slide, unclassified
            with ``unclassified="error"``.
        ClassMapError: class names the class map does not know.
    """
    from shapely import make_valid
    from shapely.geometry import box, shape

    path = Path(path)
    if unclassified not in ("skip", "error") and unclassified not in class_map.names:
        raise ParameterError(f"unclassified={unclassified!r}: use 'skip', 'error' or a class name ({', '.join(class_map.names)})")
    feats = _load_features(path)
    slide_box = box(0, 0, slide_size[0], slide_size[1]) if slide_size else None
    out: list[Annotation] = []
    unknown: set[str] = set()
    n_unclassified = n_repaired = n_outside = n_nonarea = n_suggestions = 0
    for i, f in enumerate(feats):
        props = f.get("properties") or {}
        otype = props.get("objectType")
        if otype is not None and otype not in object_types:
            continue
        fid = str(f.get("id") or props.get("id") or "")
        name = str(props.get("name") or "")
        cls = props.get("classification")
        cls_name = cls.get("name") if isinstance(cls, dict) else (cls if isinstance(cls, str) else None)
        if is_suggestion(name, cls_name is not None):
            n_suggestions += 1
            continue
        if cls_name is None:
            if name in class_map.names:
                cls_name = name
            elif unclassified == "skip":
                n_unclassified += 1
                continue
            elif unclassified == "error":
                raise AnnotationError(f"{path}: feature #{i + 1} ({name or fid or 'no name'}) has no classification; "
                                      "classify it in QuPath or pass unclassified='skip' or a class name")
            else:
                cls_name = unclassified
        if cls_name not in class_map.names:
            unknown.add(str(cls_name))
            continue
        try:
            geom = shape(f["geometry"]) if f["geometry"] else None
        except Exception as exc:  # noqa: BLE001 - shapely raises several types for bad geometry
            raise AnnotationError(f"{path}: feature #{i + 1} has an unreadable geometry ({exc}); re-export it from QuPath") from None
        if geom is None or geom.is_empty:
            continue
        if not geom.is_valid:
            geom = make_valid(geom)
            n_repaired += 1
        geom = _polygonal(geom)
        if geom is None:
            n_nonarea += 1
            continue
        if slide_box is not None:
            if not geom.intersects(slide_box):
                n_outside += 1
                continue
            if not slide_box.contains(geom):
                geom = _polygonal(geom.intersection(slide_box))
                if geom is None:
                    n_outside += 1
                    continue
        out.append(Annotation(geom, cls_name, class_map.label_of(cls_name), name, fid))
    if unknown:
        raise ClassMapError(f"{path}: unknown class name(s) {', '.join(sorted(unknown))}; known classes: "
                            f"{', '.join(class_map.names)} (rename them in QuPath or add them to {class_map.source})")
    if n_suggestions:
        log.warning("%s: skipped %d suggestion(s) of step 09 (unclassified 'Review <n>' rectangles are never labels)",
                    path, n_suggestions)
    if n_repaired:
        log.warning("%s: repaired %d invalid (e.g. self-intersecting) polygon(s) with shapely make_valid", path, n_repaired)
    if n_unclassified:
        log.warning("%s: skipped %d annotation(s) without a classification whose name is not a class "
                    "(classify them in QuPath, or pass unclassified=<class name>)", path, n_unclassified)
    if n_nonarea:
        log.warning("%s: skipped %d annotation(s) without area (points or lines)", path, n_nonarea)
    if n_outside:
        log.warning("%s: dropped %d annotation(s) entirely outside the slide %s", path, n_outside, slide_size)
    if not out and not allow_empty:
        if n_outside:
            raise AnnotationError(f"{path}: all {n_outside} annotation(s) lie outside the slide ({slide_size[0]}x{slide_size[1]} px); "
                                  "the GeoJSON belongs to another slide or uses other coordinates")
        if n_suggestions and not n_unclassified:
            raise AnnotationError(f"{path}: holds only the {n_suggestions} suggestion(s) of step 09, no labels; annotate "
                                  "inside them in QuPath (classified objects) and export the annotations again")
        if n_unclassified:
            raise AnnotationError(f"{path}: none of the {n_unclassified} annotation(s) has a classification of the class map; "
                                  f"classify them in QuPath ({', '.join(class_map.names)}) or pass unclassified=<class name>")
        raise AnnotationError(f"{path}: no polygon annotations found; draw and classify annotations in QuPath, then export them")
    out.sort(key=lambda a: -a.geometry.area)
    return out


def _shapes(items: Iterable[Any]) -> list[tuple[Any, int]]:
    """(geometry, label) pairs from Annotations or (geometry, label) tuples, largest first."""
    pairs = []
    for it in items:
        if isinstance(it, Annotation):
            pairs.append((it.geometry, int(it.label)))
        else:
            geom, label = it
            pairs.append((geom, int(label)))
    pairs.sort(key=lambda p: -p[0].area)
    return pairs


def rasterize(items: Iterable[Any], *, x: float, y: float, width: int, height: int,
              downsample: float, fill: int = 0) -> np.ndarray:
    """Label image of annotations over a region.

    Args:
        items: :class:`Annotation` objects or ``(shapely geometry, label)`` pairs in
            level-0 pixels.
        x, y: Top-left of the region in level-0 pixels.
        width, height: Output size in pixels.
        downsample: Level-0 pixels per output pixel.
        fill: Value of pixels no annotation covers (0 = unlabelled).

    Returns:
        ``(height, width)`` uint8; overlaps: the smaller annotation wins. A pixel is
        labelled when its top-left corner is inside (QuPath's rule, see the module docstring).
    """
    from rasterio.features import rasterize as rio_rasterize
    from rasterio.transform import Affine
    from shapely.geometry import box

    if width <= 0 or height <= 0 or downsample <= 0:
        raise ParameterError(f"rasterize: width, height and downsample must be > 0; got {width}, {height}, {downsample}")
    region = box(x, y, x + width * downsample, y + height * downsample)
    shapes = [(g, v) for g, v in _shapes(items) if g.intersects(region)]
    if not shapes:
        return np.full((height, width), fill, np.uint8)
    # rasterio samples pixel centres: shift the grid so that it samples QuPath's point,
    # the top-left corner (+ CORNER_OFFSET level-0 px), see the module docstring
    shift = 0.5 * downsample - CORNER_OFFSET
    transform = Affine(downsample, 0.0, x - shift, 0.0, downsample, y - shift)
    return rio_rasterize(shapes, out_shape=(height, width), transform=transform, fill=fill,
                         all_touched=False, dtype="uint8")


def annotations_to_label_image(annotations: str | Path | Sequence[Annotation], class_map: ClassMap,
                               slide_size: tuple[int, int], downsample: float, **read_kwargs: Any) -> np.ndarray:
    """Whole-slide label image at ``downsample`` (size as ``Slide.size_at``: rounded down).

    Args:
        annotations: A GeoJSON path or annotations already read.
        class_map: Classes (used when reading a path).
        slide_size: ``(width, height)`` in level-0 pixels.
        downsample: Level-0 pixels per output pixel.
        **read_kwargs: Passed to :func:`read_annotations` (e.g. ``unclassified``).
    """
    if isinstance(annotations, (str, Path)):
        annotations = read_annotations(annotations, class_map, slide_size=slide_size, **read_kwargs)
    w, h = int(slide_size[0] / downsample), int(slide_size[1] / downsample)
    return rasterize(annotations, x=0, y=0, width=max(1, w), height=max(1, h), downsample=downsample)


def class_areas(annotations: Sequence[Annotation], class_map: ClassMap, region: Any = None) -> dict[str, float]:
    """Area per class in level-0 pixels² after resolving overlaps (smaller on top), optionally within ``region``.

    This is the exact (vector) counterpart of counting pixels in :func:`rasterize`.
    """
    from shapely import union_all

    pairs = _shapes(annotations)
    areas = {n: 0.0 for n in class_map.names}
    for i, (geom, label) in enumerate(pairs):
        visible = geom
        above = [g for g, _ in pairs[i + 1:] if g.intersects(geom)]
        if above:
            visible = geom.difference(union_all(above))
        if region is not None:
            visible = visible.intersection(region)
        areas[class_map.by_label(label).name] += visible.area
    return areas


def find_annotation_file(folder: str | Path, slide_name: str) -> Path | None:
    """``<folder>/<slide>.geojson`` (or ``.json``), matched by slide name; None if absent."""
    folder = Path(folder)
    if folder.is_file():
        return folder
    for suffix in (".geojson", ".json"):
        p = folder / f"{slide_name}{suffix}"
        if p.is_file():
            return p
    return None


__all__ = ["Annotation", "read_annotations", "rasterize", "annotations_to_label_image", "class_areas",
           "find_annotation_file", "ClassMapError"]
