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
