"""Step 02 on a work folder: choose the stain reference tile and normalize every tile.

The stain arithmetic (estimation, :class:`helpers.stain.StainNormalizer`) lives in
:mod:`helpers.stain`; this module picks the reference (:func:`choose_reference`,
:func:`reference_from`) and writes ``stain/`` (:func:`normalize_tiles`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from helpers.errors import HistoUNetError, ParameterError
from helpers.stain import MIN_TISSUE_PIXELS, MODES, StainNormalizer, lab_stats
from helpers.tissue import as_rgb_uint8, pen_mask, stain_tissue_mask, tissue_fraction
from helpers.steps import guard_output, reuse_or_guard

log = logging.getLogger(__name__)


@dataclass
class ReferenceChoice:
    """The reference tile picked by :func:`choose_reference` and the table it was picked from."""

    image: np.ndarray
    index: int
    name: str
    scores: pd.DataFrame


def _load_candidates(source: Any, workdir: str | Path | None) -> tuple[list[Any], list[str], Path | None]:
    """Paths/arrays and names of candidate tiles from images, paths or a manifest."""
    if isinstance(source, pd.DataFrame) or isinstance(source, (str, Path)):
        from helpers.io import read_manifest

        if isinstance(source, pd.DataFrame):
            df = source
            root = Path(workdir) if workdir is not None else Path(".")
        else:
            df = read_manifest(source, "01_make_tiles.ipynb")
            root = Path(workdir) if workdir is not None else Path(source).resolve().parent.parent
        if "image" not in df.columns:
            raise HistoUNetError(f"{source if not isinstance(source, pd.DataFrame) else 'manifest'}: no 'image' column")
        names = df["tile_id"].astype(str).tolist() if "tile_id" in df.columns else df["image"].astype(str).tolist()
        return [root / p for p in df["image"]], names, root
    items = list(source)
    names = [Path(x).stem if isinstance(x, (str, Path)) else f"#{i}" for i, x in enumerate(items)]
    return items, names, None


def choose_reference(source: Sequence[np.ndarray] | Sequence[str | Path] | str | Path | pd.DataFrame,
                     workdir: str | Path | None = None, max_candidates: int = 200, min_tissue_fraction: float = 0.6,
                     luminosity_threshold: float = 0.8, seed: int = 0) -> ReferenceChoice:
    """Pick a well-stained, tissue-rich reference tile automatically.

    Rule: among (a random sample of at most ``max_candidates``) tiles, keep those with at
    least ``min_tissue_fraction`` tissue and less than 1 % pen-coloured pixels (if none
    qualify, the 25 % most tissue-rich); then take the one whose median tissue colour
    (LAB) is closest to the median of the kept tiles — a typical, not an outlier, stain —
    with a bonus for more tissue.

    Args:
        source: Tile images, image paths, a manifest CSV path or a manifest DataFrame.
        workdir: Root for the manifest's relative paths (default: the manifest's parent's parent).

    Raises:
        HistoUNetError: no candidate tiles.
    """
    from helpers.io import read_image

    items, names, _ = _load_candidates(source, workdir)
    if not items:
        raise HistoUNetError("choose_reference: no tiles to choose from; run 01_make_tiles first or give images")
    order = np.arange(len(items))
    if len(items) > max_candidates:
        order = np.sort(np.random.default_rng(seed).choice(len(items), max_candidates, replace=False))
    rows = []
    for i in order:
        img = as_rgb_uint8(read_image(items[i]) if isinstance(items[i], (str, Path)) else items[i], names[i])
        mask = stain_tissue_mask(img, luminosity_threshold)
        lab = lab_stats(img[mask])[0] if mask.sum() >= MIN_TISSUE_PIXELS else np.full(3, np.nan)
        rows.append({"index": int(i), "name": names[i], "tissue_fraction": float(mask.mean()),
                     "pen_fraction": float(pen_mask(img).mean()), "L": lab[0], "a": lab[1], "b": lab[2]})
    df = pd.DataFrame(rows)
    ok = (df["tissue_fraction"] >= min_tissue_fraction) & (df["pen_fraction"] < 0.01) & df["L"].notna()
    if not ok.any():
        ok = df["L"].notna() & (df["tissue_fraction"] >= df["tissue_fraction"].quantile(0.75))
        log.warning("choose_reference: no tile has %.0f%% tissue; choosing among the most tissue-rich", 100 * min_tissue_fraction)
    if not ok.any():
        raise HistoUNetError("choose_reference: no tile holds enough tissue to serve as stain reference; "
                             "pass a reference image explicitly (reference_tile=)")
    typical = df.loc[ok, ["L", "a", "b"]].median()
    df["colour_distance"] = np.sqrt(((df[["L", "a", "b"]] - typical) ** 2).sum(axis=1))
    df["score"] = np.where(ok, -df["colour_distance"] + 20 * df["tissue_fraction"].clip(upper=0.95), -np.inf)
    best = df.loc[df["score"].idxmax()]
    idx = int(best["index"])
    image = read_image(items[idx]) if isinstance(items[idx], (str, Path)) else np.asarray(items[idx])
    log.info("reference tile: %s (tissue %.0f%%, LAB distance to typical %.1f)", best["name"],
             100 * best["tissue_fraction"], best["colour_distance"])
    return ReferenceChoice(as_rgb_uint8(image).copy(), idx, str(best["name"]), df.sort_values("score", ascending=False))


def check_step(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Refuse to redo step 02 when ``out_dir/manifest.csv`` exists and ``overwrite`` is False."""
    out_dir = Path(out_dir)
    guard_output(out_dir / "manifest.csv", overwrite, "stain normalization")
    return out_dir


def reference_from(manifest_path: str | Path, reference_tile: str | None = None, workdir: str | Path | None = None,
                   **choose_kw: Any) -> ReferenceChoice:
    """The reference tile: ``reference_tile`` (a tile_id of the manifest or an image path), or automatic.

    Raises:
        ParameterError: ``reference_tile`` is neither a tile of the manifest nor an image file.
    """
    from helpers.io import read_image, read_manifest

    manifest_path = Path(manifest_path)
    root = Path(workdir) if workdir is not None else manifest_path.resolve().parent.parent
    if not reference_tile:
        return choose_reference(manifest_path, workdir=root, **choose_kw)
    df = read_manifest(manifest_path, "01_export_tiles.ipynb")
    hit = df[df["tile_id"].astype(str) == reference_tile]
    if len(hit):
        image = read_image(root / hit["image"].iloc[0])
        idx = int(hit.index[0])
    elif Path(reference_tile).is_file():
        image, idx = read_image(reference_tile), -1
    else:
        raise ParameterError(f"reference_tile={reference_tile!r} is neither a tile_id in {manifest_path} nor an "
                             "image file; leave it None to choose automatically")
    row = {"index": idx, "name": reference_tile, "tissue_fraction": tissue_fraction(image)}
    return ReferenceChoice(as_rgb_uint8(image).copy(), idx, reference_tile, pd.DataFrame([row]))


def normalize_tiles(manifest_path: str | Path, out_dir: str | Path, normalizer: StainNormalizer, mode: str = "slide",
                    workdir: str | Path | None = None, samples_per_slide: int = 32, overwrite: bool = False,
                    seed: int = 0, fingerprint: dict | None = None) -> pd.DataFrame:
    """Normalize every tile of a tile manifest; write ``tiles/<tile_id>.png`` and ``manifest.csv``.

    Args:
        manifest_path: ``workdir/tiles/manifest.csv`` (paths relative to ``workdir``).
        out_dir: ``workdir/stain``.
        normalizer: A fitted :class:`StainNormalizer`.
        mode: ``"slide"`` (estimate each slide's stains once, fast and seamless) or
            ``"tile"`` (staintools per tile).
        workdir: Root of the manifest's relative paths (default: the manifest's parent's parent).
        samples_per_slide: Tiles per slide (the most tissue-rich of a random draw) used to estimate its stains.
        overwrite: Replace an earlier result.
        fingerprint: The step's parameters and inputs (:func:`helpers.steps.fingerprint_of`): a
            finished ``out_dir`` made the same way is reused (:func:`helpers.steps.reuse_or_guard`).

    Returns:
        The new manifest: input rows with ``image`` = normalized tile, ``image_raw`` = input
        tile, ``stain_status`` = ``normalized`` / ``passthrough: <reason>``. For method
        ``none`` the images point to the raw tiles. Per-slide estimates go to ``slides.json``.
    """
    from tqdm.auto import tqdm

    from helpers.io import read_image, read_manifest, write_image, write_json, write_manifest

    if mode not in MODES:
        raise ParameterError(f"mode={mode!r} is unknown; use 'slide' (fast, seamless) or 'tile' (staintools per tile)")
    manifest_path, out_dir = Path(manifest_path), Path(out_dir)
    root = Path(workdir) if workdir is not None else manifest_path.resolve().parent.parent
    out_manifest = out_dir / "manifest.csv"
    if fingerprint is not None and reuse_or_guard(out_dir, fingerprint, overwrite, "stain normalization",
                                                  in_place=True, guard=False):
        return pd.read_csv(out_manifest)
    guard_output(out_manifest, overwrite, "stain normalization")
    df = read_manifest(manifest_path, "01_make_tiles.ipynb")
    for col in ("tile_id", "slide", "image"):
        if col not in df.columns:
            raise HistoUNetError(f"{manifest_path}: column {col!r} missing; re-run 01_make_tiles")
    df = df.copy()
    df["image_raw"] = df["image"]
    df["stain_status"] = "normalized"
    slides_info: dict[str, Any] = {}
    tiles_dir = out_dir / "tiles"
    rng = np.random.default_rng(seed)
    if normalizer.method == "none":
        log.info("stain method 'none': the manifest points to the raw tiles")
    else:
        tiles_dir.mkdir(parents=True, exist_ok=True)
        for slide, group in df.groupby("slide", sort=False):
            fn: Callable[[np.ndarray], np.ndarray] | None = None
            if mode == "slide":
                draw = group.index.to_numpy()
                if len(draw) > 3 * samples_per_slide:
                    draw = rng.choice(draw, 3 * samples_per_slide, replace=False)
                cands = [(read_image(root / df.at[i, "image"])) for i in draw]
                fracs = [tissue_fraction(c, normalizer.luminosity_threshold) for c in cands]
                keep = np.argsort(fracs)[::-1][:samples_per_slide]
                fn = normalizer.for_slide([cands[k] for k in keep], seed=seed)
                slides_info[str(slide)] = {**fn.to_dict(), "n_sample_tiles": len(keep)}
            for i in tqdm(group.index, desc=f"stain {slide}", leave=False):
                img = read_image(root / df.at[i, "image"])
                if fn is not None:
                    out, status = fn(img), fn.status
                else:
                    out, status = normalizer.transform_with_status(img)
                rel = Path(out_dir.name) / "tiles" / f"{df.at[i, 'tile_id']}.png"
                # no manifest yet means any tile already here is from an unfinished run
                write_image(out, tiles_dir / f"{df.at[i, 'tile_id']}.png", overwrite=True)
                df.at[i, "image"] = rel.as_posix()
                df.at[i, "stain_status"] = status
    write_json({"method": normalizer.method, "mode": mode, "slides": slides_info}, out_dir / "slides.json", overwrite=True)
    n_pass = int(df["stain_status"].str.startswith("passthrough").sum())
    if n_pass:
        log.warning("%d of %d tiles passed through unchanged (see stain_status in the manifest)", n_pass, len(df))
    write_manifest(df, out_manifest, overwrite=overwrite)
    return df
