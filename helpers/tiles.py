"""Cut image and label tiles from slides and their QuPath annotations (step 01).

Two routes write the same files (see ``docs/workfolder.md``):

* QuPath: ``groovy/export_tiles.groovy`` (``LabeledImageServer`` + ``TileExporter``);
  its folder has no manifest, :func:`read_tile_folder` rebuilds one from the names.
* Python: :func:`export_tiles` reads slides with OpenSlide (``helpers.slides``) and
  rasterizes the GeoJSON annotations (``helpers.annotations``).

Names follow QuPath's ``TileExporter``: ``<slide> [d=D,x=X,y=Y,w=W,h=H].png`` with
``d=`` omitted when the downsample is 1 and at most 5 decimals otherwise (``d=2``,
``d=1.5``); the label tile is ``<same stem>-labelled.png``. The tile grid is QuPath's
too: tile origins every ``tile_size - overlap`` output pixels from 0, level-0
coordinates rounded half-up, partial tiles at the right/bottom edge dropped.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from helpers.config import ClassMap
from helpers.steps import DONE, fingerprint_of, record_fingerprint, reuse_or_guard, step_dir
from helpers.errors import AnnotationError, HistoUNetError, ParameterError

log = logging.getLogger(__name__)

LABEL_SUFFIX = "-labelled.png"
IMAGE_EXT = ".png"
_NAME_RE = re.compile(r"^(?P<slide>.*) \[(?P<region>[^\[\]]*)\]$")


def _round_half_up(v: float) -> int:
    """Java's ``Math.round`` (QuPath rounds tile coordinates with it)."""
    return int(math.floor(v + 0.5))


def format_downsample(downsample: float) -> str:
    """The ``d=`` value as QuPath writes it: up to 5 decimals, no trailing zeros."""
    s = f"{downsample:,.5f}".rstrip("0").rstrip(".")
    return s


def tile_name(slide: str, x: int, y: int, w: int, h: int, downsample: float) -> str:
    """Tile stem in QuPath TileExporter's convention, e.g. ``demo [d=2,x=0,y=512,w=512,h=512]``."""
    d = "" if downsample == 1.0 else f"d={format_downsample(downsample)},"
    return f"{slide} [{d}x={int(x)},y={int(y)},w={int(w)},h={int(h)}]"


def parse_tile_name(stem: str) -> dict:
    """Inverse of :func:`tile_name`: ``{"slide", "x", "y", "w", "h", "downsample"}``.

    Raises:
        ParameterError: the stem does not follow the convention.
    """
    m = _NAME_RE.match(stem)
    if not m:
        raise ParameterError(f"{stem!r}: not a QuPath tile name '<slide> [d=..,x=..,y=..,w=..,h=..]'")
    values: dict[str, str] = {}
    for part in re.split(r",(?=[a-z]=)", m.group("region")):
        key, _, val = part.partition("=")
        values[key.strip()] = val.strip()
    try:
        out = {"slide": m.group("slide"), "x": int(values["x"]), "y": int(values["y"]), "w": int(values["w"]),
               "h": int(values["h"]), "downsample": float(values.get("d", "1").replace(",", ""))}
    except (KeyError, ValueError):
        raise ParameterError(f"{stem!r}: tile name lacks x, y, w or h") from None
    return out


def tile_grid(width: int, height: int, downsample: float, tile_size: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Tile regions ``(x, y, w, h)`` in level-0 pixels, as QuPath's TileExporter makes them.

    Args:
        width, height: Slide size in level-0 pixels.
        downsample: Level-0 pixels per tile pixel.
        tile_size: Tile side in output pixels.
        stride: Step between tile origins in output pixels (``tile_size - overlap``).
    """
    if tile_size <= 0 or stride <= 0:
        raise ParameterError(f"tile_size and stride must be > 0; got {tile_size}, {stride}")
    max_x, max_y = int(width / downsample), int(height / downsample)
    regions = []
    for ty in range(0, max_y, stride):
        y0, y1 = _round_half_up(ty * downsample), _round_half_up((ty + tile_size) * downsample)
        if y1 > height or y1 == y0:
            continue
        for tx in range(0, max_x, stride):
            x0, x1 = _round_half_up(tx * downsample), _round_half_up((tx + tile_size) * downsample)
            if x1 > width or x1 == x0:
                continue
            regions.append((x0, y0, x1 - x0, y1 - y0))
    return regions


def label_counts(label: np.ndarray, class_map: ClassMap) -> dict[str, int]:
    """``px_unlabelled`` and ``px_<Class>`` pixel counts of a label tile."""
    counts = np.bincount(label.ravel(), minlength=256)
    out = {"px_unlabelled": int(counts[class_map.ignore_label])}
    for c in class_map.classes:
        out[f"px_{c.name}"] = int(counts[c.label])
    unknown = int(counts.sum() - out["px_unlabelled"] - sum(out[f"px_{n}"] for n in class_map.names))
    if unknown:
        raise HistoUNetError(f"label tile has {unknown} pixels with values outside 0..{class_map.n_classes}; "
                             f"re-export with the class map {class_map.source}")
    return out


def read_label_tile(path: str | Path) -> np.ndarray:
    """A label tile as a 2-D uint8 array of label values.

    QuPath's ``LabeledImageServer`` writes *indexed* (palette) PNGs; generic readers turn
    those into palette colours, so the indices are read here with Pillow.

    Raises:
        HistoUNetError: unreadable file, or an RGB image whose channels differ (not labels).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.array(im) if im.mode in ("P", "L", "I", "I;16") else np.array(im.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the same user problem
        raise HistoUNetError(f"{path}: cannot read label tile ({exc}); re-export it") from None
    if arr.ndim == 3:
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise HistoUNetError(f"{path}: a colour image, not a label tile; export labels with multichannelOutput(false)")
        arr = arr[..., 0]
    if arr.max(initial=0) > 255:
        raise HistoUNetError(f"{path}: label values above 255; labels must be uint8 (0 unlabelled, 1..N classes)")
    return arr.astype(np.uint8)


MANIFEST_COLUMNS = ["tile_id", "slide", "image", "label", "x", "y", "w", "h", "downsample", "mpp"]


def _check_slides(slides: Sequence[Path], annotations: Path) -> list[tuple[Path, Path]]:
    from helpers.annotations import find_annotation_file

    pairs, missing = [], []
    for s in slides:
        a = find_annotation_file(annotations, s.stem)
        (pairs.append((s, a)) if a is not None else missing.append(s.stem))
    if missing:
        log.warning("no annotations for slide(s) %s in %s; they are skipped", ", ".join(missing), annotations)
    if not pairs:
        raise AnnotationError(f"{annotations}: no <slide>.geojson matches the slides ({', '.join(s.stem for s in slides)}); "
                              "export annotations from QuPath with the slide's name")
    return pairs


def export_tiles(workdir: str | Path, class_map: ClassMap, slides: str | Path | None = None,
                 annotations: str | Path | None = None, mpp: float = 1.0, slide_mpp: float | None = None,
                 tile_size: int = 256, stride: int = 256, min_labelled_fraction: float = 0.05,
                 max_glass_fraction: float = 0.95, unclassified: str = "skip", max_tiles_per_slide: int | None = None,
                 background_class: str | None = None, glass_tiles: int = 0, overwrite: bool = False) -> pd.DataFrame:
    """Python route of step 01: write image/label tile pairs and ``tiles/manifest.csv``.

    Args:
        workdir: Work folder; tiles go to ``<workdir>/tiles``.
        class_map: Classes and label values.
        slides: A slide file or folder (default ``<workdir>/slides``).
        annotations: A GeoJSON file or folder of ``<slide>.geojson`` (default ``<workdir>/annotations``).
        mpp: Tile resolution in microns per pixel.
        slide_mpp: Level-0 microns per pixel of the slides, overriding the files' value
            (needed for slides that store none).
        tile_size: Tile side in pixels.
        stride: Step between tiles in pixels (``tile_size`` = no overlap).
        min_labelled_fraction: Keep tiles with at least this fraction of labelled pixels.
        max_glass_fraction: Skip tiles that are more glass than this (1.0 keeps all), unless
            they carry ``background_class`` annotations (glass annotated on purpose).
        unclassified: Policy for unclassified annotations (see :func:`helpers.annotations.read_annotations`).
        max_tiles_per_slide: Keep at most this many tiles per slide (evenly spread); None = all.
        background_class: The class of glass (see ``max_glass_fraction``); None = the map's background role.
        glass_tiles: Per slide, up to this many extra tiles that hold glass but too few
            annotations, taken inside the bounding box of the slide's annotations, most glass first
            (:func:`glass_rich_tiles`); their glass is labelled by 03's free-glass rule. 0 = none.
        overwrite: Replace an earlier ``tiles/`` folder.

    Returns:
        The manifest (also written to ``tiles/manifest.csv``).
    """
    from shapely import STRtree
    from shapely.geometry import box
    from tqdm.auto import tqdm

    from helpers.annotations import rasterize, read_annotations
    from helpers.io import atomic_dir, write_image, write_manifest
    from helpers.tissue import glass_mask
    from helpers.slides import find_slides, open_slide

    workdir = Path(workdir)
    if not 0 <= min_labelled_fraction <= 1:
        raise ParameterError(f"min_labelled_fraction must be within 0..1; got {min_labelled_fraction}")
    if not 0 <= max_glass_fraction <= 1:
        raise ParameterError(f"max_glass_fraction must be within 0..1; got {max_glass_fraction}")
    if tile_size < 16:
        raise ParameterError(f"tile_size must be >= 16 pixels; got {tile_size}")
    if stride <= 0 or not mpp > 0:
        raise ParameterError(f"stride and mpp must be > 0; got stride={stride}, mpp={mpp}")
    slides_path = Path(slides) if slides else step_dir(workdir, "slides")
    ann_path = Path(annotations) if annotations else step_dir(workdir, "annotations")
    pairs = _check_slides(find_slides(slides_path), ann_path)
    out_dir = step_dir(workdir, "tiles")
    fingerprint = fingerprint_of(dict(classes=class_map.names, mpp=mpp, slide_mpp=slide_mpp, tile_size=tile_size,
                                      stride=stride, min_labelled_fraction=min_labelled_fraction,
                                      max_glass_fraction=max_glass_fraction, unclassified=unclassified,
                                      max_tiles_per_slide=max_tiles_per_slide, background_class=background_class,
                                      glass_tiles=glass_tiles),
                                 [p for pair in pairs for p in pair])
    if reuse_or_guard(out_dir, fingerprint, overwrite, "tile export", guard=False):
        return pd.read_csv(out_dir / DONE)
    rows: list[dict] = []
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        record_fingerprint(tmp, fingerprint)
        for slide_path, geojson in pairs:
            with open_slide(slide_path, mpp=slide_mpp) as slide:
                ds = slide.downsample_for(mpp)
                width, height = slide.dimensions
                if tile_size * ds > width or tile_size * ds > height:
                    raise ParameterError(f"{slide_path}: tile_size {tile_size} px at {mpp} um/px spans {tile_size * ds:.0f} "
                                         f"level-0 px, more than the slide ({width}x{height}); use a smaller tile_size or larger mpp")
                if ds < 1:
                    log.warning("%s: %s um/px is finer than the slide (%s um/px); tiles are upsampled", slide_path, mpp, slide.mpp)
                anns = read_annotations(geojson, class_map, slide_size=(width, height), unclassified=unclassified)
                tree = STRtree([a.geometry for a in anns])
                grid = tile_grid(width, height, ds, tile_size, stride)
                kept: list[tuple] = []
                for (x, y, w, h) in tqdm(grid, desc=slide.name, unit="tile", leave=False):
                    idx = tree.query(box(x, y, x + w, y + h))
                    if len(idx) == 0:
                        continue
                    label = rasterize([anns[i] for i in idx], x=x, y=y, width=tile_size, height=tile_size, downsample=ds)
                    if (label > 0).mean() < max(min_labelled_fraction, 1e-12):
                        continue
                    kept.append((x, y, w, h, label))
                if max_tiles_per_slide and len(kept) > max_tiles_per_slide:
                    pick = np.linspace(0, len(kept) - 1, max_tiles_per_slide).round().astype(int)
                    kept = [kept[i] for i in sorted(set(pick))]
                if glass_tiles > 0 and anns:
                    kept += glass_rich_tiles(slide, grid, kept, anns, ds, tile_size, glass_tiles,
                                             max_glass=max_glass_fraction)
                n_glass = 0
                if background_class is None:
                    glass_label = next((c.label for c in class_map.classes if c.role == "background"), -1)
                else:
                    glass_label = class_map.label_of(background_class) if background_class in class_map.names else -1
                for (x, y, w, h, label) in tqdm(kept, desc=f"{slide.name} write", unit="tile", leave=False):
                    image = slide.read(x, y, tile_size, tile_size, ds)
                    if (max_glass_fraction < 1 and not (label == glass_label).any()
                            and glass_mask(image).mean() > max_glass_fraction):
                        n_glass += 1
                        continue
                    stem = tile_name(slide.name, x, y, w, h, ds)
                    write_image(image, tmp / f"{stem}{IMAGE_EXT}")
                    write_image(label, tmp / f"{stem}{LABEL_SUFFIX}")
                    rows.append({"tile_id": stem, "slide": slide.name, "image": f"tiles/{stem}{IMAGE_EXT}",
                                 "label": f"tiles/{stem}{LABEL_SUFFIX}", "x": x, "y": y, "w": w, "h": h,
                                 "downsample": ds, "mpp": mpp, **label_counts(label, class_map)})
                log.info("%s: %d tiles of %d kept (%d annotations, %d glass tiles skipped, downsample %.4g)",
                         slide.name, sum(r["slide"] == slide.name for r in rows), len(grid), len(anns), n_glass, ds)
        if not rows:
            raise AnnotationError(f"{ann_path}: no tile has >= {min_labelled_fraction:.0%} labelled pixels; "
                                  "lower min_labelled_fraction or tile_size, or check the annotations")
        manifest = pd.DataFrame(rows)
        write_manifest(manifest, tmp / "manifest.csv")
    return manifest


def glass_rich_tiles(slide, grid: list[tuple[int, int, int, int]], kept: list[tuple], anns: list, ds: float,
                     tile_size: int, n: int, min_glass: float = 0.2, max_glass: float = 0.95) -> list[tuple]:
    """Up to ``n`` grid tiles not in ``kept``, centred inside the annotations' bounding box, most glass first.

    Sparse annotations rarely cover open glass, so the network sees little of it; these
    tiles (unlabelled here) get their glass labelled by 03's free-glass rule
    (:func:`helpers.tissue.glass_mask`). Only tiles with ``min_glass`` to ``max_glass`` glass
    count (a tile of glass alone teaches no border).

    Returns:
        ``[(x, y, w, h, empty label tile), ...]``.
    """
    from shapely.ops import unary_union

    from helpers.tissue import glass_mask

    bx0, by0, bx1, by1 = unary_union([a.geometry for a in anns]).bounds
    taken = {(k[0], k[1]) for k in kept}
    cands = [g for g in grid if (g[0], g[1]) not in taken
             and bx0 <= g[0] + g[2] / 2 <= bx1 and by0 <= g[1] + g[3] / 2 <= by1]
    if len(cands) > 8 * n:  # look at an even spread of candidates, not all of a large slide
        cands = [cands[i] for i in sorted(set(np.linspace(0, len(cands) - 1, 8 * n).round().astype(int)))]
    scored = []
    for (x, y, w, h) in cands:
        g = float(glass_mask(slide.read(x, y, tile_size, tile_size, ds)).mean())
        if min_glass <= g <= max_glass:
            scored.append((g, (x, y, w, h)))
    scored.sort(key=lambda t: -t[0])
    return [(*box, np.zeros((tile_size, tile_size), np.uint8)) for _, box in scored[:n]]


def read_tile_folder(folder: str | Path, class_map: ClassMap, workdir: str | Path | None = None,
                     slide_mpp: float | dict[str, float] | None = None) -> pd.DataFrame:
    """Manifest of a tile folder, rebuilt from TileExporter file names when it has no ``manifest.csv``.

    Args:
        folder: Folder of ``<slide> [d=..,x=..,y=..,w=..,h=..].png`` + ``-labelled.png`` pairs.
        class_map: Classes (for the ``px_*`` counts and a check of the label values).
        workdir: Paths in the manifest are relative to it (default: ``folder``'s parent).
        slide_mpp: Level-0 um/px of the slides (one value or per slide name) to fill
            ``mpp``; NaN when unknown.

    Raises:
        HistoUNetError: no tiles, or a tile without its label tile.
    """
    from helpers.io import read_manifest

    folder = Path(folder)
    workdir = Path(workdir) if workdir else folder.parent
    if (folder / "manifest.csv").is_file():
        return read_manifest(folder / "manifest.csv")
    if not folder.is_dir():
        raise HistoUNetError(f"{folder}: tile folder not found; run notebook 01 or export tiles with groovy/export_tiles.groovy")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".tif", ".tiff", ".jpg")
                    and not p.stem.endswith("-labelled") and _NAME_RE.match(p.stem))
    if not images:
        raise HistoUNetError(f"{folder}: no tiles named '<slide> [d=..,x=..,y=..,w=..,h=..].png'; export them with groovy/export_tiles.groovy")
    rows = []
    missing = []
    for img in images:
        lab = img.with_name(img.stem + LABEL_SUFFIX)
        if not lab.is_file():
            missing.append(lab.name)
            continue
        info = parse_tile_name(img.stem)
        label = read_label_tile(lab)
        smpp = slide_mpp.get(info["slide"]) if isinstance(slide_mpp, dict) else slide_mpp
        rows.append({"tile_id": img.stem, "slide": info["slide"],
                     "image": Path(img).resolve().relative_to(workdir.resolve()).as_posix(),
                     "label": Path(lab).resolve().relative_to(workdir.resolve()).as_posix(),
                     "x": info["x"], "y": info["y"], "w": info["w"], "h": info["h"], "downsample": info["downsample"],
                     "mpp": smpp * info["downsample"] if smpp else float("nan"), **label_counts(label, class_map)})
    if missing:
        raise HistoUNetError(f"{folder}: {len(missing)} tile(s) lack a label tile (e.g. {missing[0]}); export with a labeledServer")
    return pd.DataFrame(rows)


def import_tile_folder(folder: str | Path, workdir: str | Path, class_map: ClassMap,
                       slide_mpp: float | dict[str, float] | None = None, overwrite: bool = False) -> pd.DataFrame:
    """QuPath route of step 01: copy a TileExporter folder into ``<workdir>/tiles`` with a manifest.

    Label tiles are rewritten as plain greyscale PNGs (QuPath writes palette PNGs, which
    generic image readers would turn into colours).
    """
    from helpers.io import atomic_dir, write_image, write_manifest

    folder, workdir = Path(folder), Path(workdir)
    out_dir = step_dir(workdir, "tiles")
    fingerprint = fingerprint_of(dict(classes=class_map.names, slide_mpp=slide_mpp),
                                 sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else [])
    if reuse_or_guard(out_dir, fingerprint, overwrite, "tile import", guard=False):
        return pd.read_csv(out_dir / DONE)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        record_fingerprint(tmp, fingerprint)
        for p in Path(folder).iterdir():
            if p.is_file() and _NAME_RE.match(p.stem.removesuffix("-labelled")):
                if p.name.endswith(LABEL_SUFFIX):
                    write_image(read_label_tile(p), tmp / p.name)
                else:
                    shutil.copy2(p, tmp / p.name)
        manifest = read_tile_folder(tmp, class_map, workdir=tmp.parent, slide_mpp=slide_mpp)
        manifest["image"] = "tiles/" + manifest["image"].str.split("/").str[-1]
        manifest["label"] = "tiles/" + manifest["label"].str.split("/").str[-1]
        write_manifest(manifest, tmp / "manifest.csv")
    return manifest
