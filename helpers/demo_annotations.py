"""Sparse demo annotations, drawn from the demo slide's coarse layout as a person would in QuPath."""

from __future__ import annotations

import math

import numpy as np

from helpers.config import ClassMap
from helpers.demo_slide import DemoSlide

def _mask_polygons(mask: np.ndarray, step: float, min_area: float = 0.0):
    """Polygons (level-0 px) of a coarse boolean mask; holes kept."""
    import cv2
    from shapely.geometry import Polygon
    from shapely.ops import unary_union

    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    polys = []
    if hierarchy is None:
        return polys
    for i, c in enumerate(contours):
        if hierarchy[0][i][3] != -1 or len(c) < 3:
            continue
        holes = [(contours[j][:, 0, :] + 0.5) * step for j in range(len(contours))
                 if hierarchy[0][j][3] == i and len(contours[j]) >= 3]
        poly = Polygon((c[:, 0, :] + 0.5) * step, holes).buffer(0)
        if poly.area > min_area:
            polys.append(poly)
    return list(getattr(unary_union(polys), "geoms", [unary_union(polys)])) if polys else []

def _stroke(dist: np.ndarray, start: tuple[int, int], rng: np.random.Generator, n_steps: int,
            step_len: float, min_dist: float) -> list[tuple[float, float]]:
    """A wandering line on the coarse grid that stays where ``dist`` > ``min_dist``."""
    h, w = dist.shape
    pts = [(float(start[0]), float(start[1]))]
    heading = rng.uniform(0, 2 * math.pi)
    for _ in range(n_steps):
        best = None
        for turn in rng.permutation(np.linspace(-0.9, 0.9, 7)):
            ang = heading + turn
            nx, ny = pts[-1][0] + step_len * math.cos(ang), pts[-1][1] + step_len * math.sin(ang)
            if not (0 <= nx < w and 0 <= ny < h):
                continue
            d = dist[int(ny), int(nx)]
            if d > min_dist and (best is None or d > best[0]):
                best = (d, ang, nx, ny)
        if best is None:
            break
        heading = best[1]
        pts.append((best[2], best[3]))
    return pts

def make_annotations(model: DemoSlide, class_map: ClassMap, seed: int, budget: float = 0.13) -> tuple[list[dict], dict]:
    """Sparse, partly imperfect QuPath annotations drawn from the demo's coarse layout.

    A tumour region of interest around the main tumour mass (drawn a little generously,
    so it spills onto stroma), small tumour outlines elsewhere, a rough polygon of glass
    beside the tissue, and wandering brush strokes of stroma (one running off the tissue
    onto the glass), muscle and glass.
    Their total area stays below ``budget`` of the tissue area.

    Returns:
        ``(features, stats)``: QuPath GeoJSON features (level-0 px) and area statistics.
    """
    import cv2
    from shapely.geometry import LineString, Point, Polygon, box
    from shapely.ops import unary_union

    from helpers.qupath import make_feature

    rng = np.random.default_rng([seed, 7])
    lab = model.coarse_labels()
    step = model.step
    um_grid = model.um / step  # coarse grid points per micron
    L = min(lab.shape)
    tissue_area = float((lab != model.labels["glass"]).sum()) * step * step
    frame = box(0, 0, model.width, model.height)
    shapes: list[tuple[str, object, str]] = []  # (role, geometry, description)

    def mask(role):
        return lab == model.labels[role]

    def dist_of(m):
        return cv2.distanceTransform(m.astype(np.uint8), cv2.DIST_L2, 5)

    # Tumour ROI: the tumour component around the main centre, inside a disk, drawn generously.
    tum = mask("tumour")
    core = dist_of(tum) > 6 * um_grid
    n, comp = cv2.connectedComponents(core.astype(np.uint8))
    cx, cy = model.tumour_centres[0][0] / step, model.tumour_centres[0][1] / step
    spill = 12 * model.um
    if n > 1:
        yy, xx = np.nonzero(comp > 0)
        k = int(np.argmin((xx - cx) ** 2 + (yy - cy) ** 2))
        cx, cy = xx[k], yy[k]
        chosen = comp == comp[cy, cx]
        radius = 0.16 * L
        while True:
            yy, xx = np.mgrid[:lab.shape[0], :lab.shape[1]]
            roi = chosen & ((xx - cx) ** 2 + (yy - cy) ** 2 < radius ** 2)
            area = roi.sum() * step * step
            if area <= 0.04 * tissue_area or radius < 0.03 * L:
                break
            radius *= 0.9
        polys = _mask_polygons(roi, step)
        if polys:
            roi_poly = max(polys, key=lambda g: g.area).buffer(spill).simplify(2 * model.um)
            shapes.append(("tumour", roi_poly, "tumour region of interest"))
    # Small tumour outlines at the other tumour sites (nests at the invasive front).
    for tx, ty, _ in model.tumour_centres[1:]:
        if n <= 1:
            break
        yy, xx = np.nonzero(core)
        if not len(xx):
            break
        k = int(np.argmin((xx - tx / step) ** 2 + (yy - ty / step) ** 2))
        comp_mask = comp == comp[yy[k], xx[k]]
        disk = Point(xx[k] * step, yy[k] * step).buffer(0.035 * L * step)
        for poly in _mask_polygons(comp_mask, step):
            piece = poly.buffer(-4 * model.um).intersection(disk)
            if piece.area > 0:
                piece = max(getattr(piece, "geoms", [piece]), key=lambda g: g.area)
                shapes.append(("tumour", piece.simplify(2 * model.um), "tumour nest"))
                break
    # A rough polygon of glass beside the tissue (people outline background generously).
    glass_d = dist_of(mask("glass"))
    used = np.zeros(lab.shape, bool)
    cand = np.argwhere((glass_d > 0.03 * L) & (glass_d < 0.07 * L))
    if len(cand):
        gy_, gx_ = cand[rng.integers(len(cand))]
        rad = float(min(0.045 * L, glass_d[gy_, gx_] - 1)) * step
        angles = np.sort(rng.uniform(0, 2 * np.pi, 9))
        radii = rad * rng.uniform(0.75, 1.0, 9)
        poly = Polygon(np.c_[(gx_ + 0.5) * step + radii * np.cos(angles), (gy_ + 0.5) * step + radii * np.sin(angles)])
        if poly.is_valid and poly.area > 0:
            shapes.append(("glass", poly, "glass region"))
            used[max(0, gy_ - int(0.1 * L)):gy_ + int(0.1 * L), max(0, gx_ - int(0.1 * L)):gx_ + int(0.1 * L)] = True
    # Brush strokes of the other classes, spread over the slide.
    width_px = float(np.clip(0.018 * min(model.width, model.height), 10 * model.um, 50 * model.um))
    plan = {"stroma": 4, "other": 3, "glass": 2}
    for role, count in plan.items():
        m = mask(role)
        if role == "glass":  # background strokes near the tissue, where it matters
            near = dist_of(m) < 0.08 * L  # distance from the glass to the tissue
            m = m & near
        d = dist_of(m)
        min_d = width_px / step / 2 + 2
        for i in range(count):
            cand = np.argwhere((d > min_d + 1) & ~used)
            if not len(cand):
                break
            yx = cand[rng.integers(len(cand))]
            pts = _stroke(np.where(used, 0, d), (yx[1], yx[0]), rng, n_steps=int(rng.integers(4, 8)),
                          step_len=0.035 * L, min_dist=min_d)
            if len(pts) < 2:
                continue
            line = LineString([((px + 0.5) * step, (py + 0.5) * step) for px, py in pts])
            desc = f"{role} stroke"
            if role == "stroma" and i == 0:
                line, desc = _run_off_tissue(line, lab, model, step), "stroma stroke touching glass"
            geom = line.buffer(width_px / 2, cap_style="round")
            shapes.append((role, geom, desc))
            gx0, gy0, gx1, gy1 = (int(v / step) for v in geom.buffer(0.06 * L * step).bounds)
            used[max(0, gy0):gy1 + 1, max(0, gx0):gx1 + 1] = True
    # Keep within the budget: drop the last strokes of the most annotated class if needed.
    shapes = [(r, g.intersection(frame), d) for r, g, d in shapes if not g.intersection(frame).is_empty]

    def total():
        return unary_union([g for _, g, _ in shapes]).area

    while total() > budget * tissue_area:
        areas: dict[str, float] = {}
        counts: dict[str, int] = {}
        for r, g, _ in shapes:
            areas[r] = areas.get(r, 0) + g.area
            counts[r] = counts.get(r, 0) + 1
        droppable = [r for r in areas if counts[r] > 1]  # every class keeps its first shape
        if not droppable:
            break
        worst = max(droppable, key=areas.get)
        shapes.pop(max(i for i, (r, _, _) in enumerate(shapes) if r == worst))
    features = []
    for role, geom, desc in shapes:
        cls = class_map.by_label(model.labels[role])
        features.append(make_feature(geom, cls.name, cls.color, name=desc,
                                     feature_id=str(_uuid(rng))))
    stats = {"tissue_area_px": tissue_area, "annotated_fraction_of_tissue": total() / tissue_area}
    for role in model.labels:
        name = class_map.by_label(model.labels[role]).name
        area = sum(g.area for r, g, _ in shapes if r == role)
        stats[f"annotated_fraction_{name}"] = area / tissue_area
    return features, stats

def _uuid(rng: np.random.Generator):
    """A random-looking but seed-determined UUID (version 4 layout)."""
    import uuid

    return uuid.UUID(bytes=rng.bytes(16), version=4)

def _run_off_tissue(line, lab: np.ndarray, model: DemoSlide, step: int):
    """Extend a stroke from its end nearest the tissue edge a little beyond it, onto glass."""
    import cv2
    from shapely.geometry import LineString

    glass = (lab == model.labels["glass"]).astype(np.uint8)
    d_glass = cv2.distanceTransform(1 - glass, cv2.DIST_L2, 5)
    coords = list(line.coords)
    ends = [coords[0], coords[-1]]
    dists = [d_glass[min(lab.shape[0] - 1, int(y / step)), min(lab.shape[1] - 1, int(x / step))] for x, y in ends]
    end = ends[int(np.argmin(dists))]
    yy, xx = np.nonzero(glass)
    if not len(xx):
        return line
    k = int(np.argmin(((xx + 0.5) * step - end[0]) ** 2 + ((yy + 0.5) * step - end[1]) ** 2))
    gx, gy = (xx[k] + 0.5) * step, (yy[k] + 0.5) * step
    vx, vy = gx - end[0], gy - end[1]
    norm = math.hypot(vx, vy) or 1.0
    over = 25 * model.um  # how far the brush runs onto the glass
    tip = (gx + vx / norm * over, gy + vy / norm * over)
    if norm > 0.25 * min(model.width, model.height):
        return line
    return LineString(coords + [tip] if end == coords[-1] else [tip] + coords)
