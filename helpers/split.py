"""Train / validation split of the tile table (step 05): by slide, or by spatial blocks of a slide.

Overlapping or neighbouring tiles never sit on both sides: with a region split, training
tiles that overlap, touch or come near a validation tile are marked ``excluded``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from helpers.errors import ParameterError

#: Column of the split table holding ``train`` / ``val`` / ``excluded``.
SPLIT_COLUMN = "split"
#: File (in 05's training-label folder) of the blocks :func:`rare_class_blocks` added to validation.
VAL_BLOCKS = "val_blocks.json"
#: Folder of a model folder where the pixel split writes training labels and :data:`VAL_BLOCKS`.
TRAIN_LABELS_DIR = "train_labels"


def split_tiles(df: pd.DataFrame, val_fraction: float = 0.25, by: str = "auto", block_size: float | None = None,
                seed: int = 0, class_names: list[str] | None = None, trials: int = 200, margin: float = 0.0) -> pd.DataFrame:
    """Split tiles into ``train`` / ``val`` (column ``split``) by slide or by spatial region.

    ``by="slide"`` puts whole slides on one side. ``by="region"`` cuts each slide into
    square blocks of ``block_size`` level-0 pixels (default: 3 tile widths), assigns each
    tile to the block holding its centre, and draws validation blocks; any training tile
    that overlaps, touches or comes within ``margin`` level-0 pixels of a validation tile
    is then marked ``excluded``, so no pixel (and no direct neighbour) is on both sides
    even when tiles overlap. ``"auto"`` is by slide with three slides or more, else by
    region. Among ``trials`` random draws the one whose per-class labelled-pixel share in
    validation is closest to ``val_fraction`` (tumour present on both sides) and which
    excludes the fewest tiles is kept.

    Returns:
        A copy of ``df`` with ``split`` (train / val / excluded) and ``group`` columns.
    """
    if not 0 < val_fraction < 1:
        raise ParameterError(f"val_fraction={val_fraction}: must be between 0 and 1")
    if by not in ("auto", "slide", "region"):
        raise ParameterError(f"split_by={by!r}: use 'slide', 'region' or 'auto'")
    df = df.copy().reset_index(drop=True)
    n_slides = df["slide"].nunique()
    if by == "auto":
        by = "slide" if n_slides >= 3 else "region"
    if by == "slide":
        if n_slides < 2:
            raise ParameterError(f"split_by='slide' needs two slides or more; got {n_slides}; use split_by='region'")
        df["group"] = df["slide"].astype(str)
    else:
        if block_size is None:
            block_size = 3 * float(np.median(df["w"]))
        cx = (df["x"] + df["w"] / 2) // block_size
        cy = (df["y"] + df["h"] / 2) // block_size
        df["group"] = [f"{s}|{int(i)},{int(j)}" for s, i, j in zip(df["slide"], cx, cy)]
    groups = sorted(df["group"].unique())
    if len(groups) < 2:
        raise ParameterError(f"only one {by} group; lower block_size (now {block_size}) or add slides")
    px_cols = [f"px_{n}" for n in class_names] if class_names else []
    px_cols = [c for c in px_cols if c in df.columns]
    weights = df[px_cols].to_numpy(float) if px_cols else np.ones((len(df), 1))
    group_idx = np.searchsorted(groups, df["group"].to_numpy())
    per_group = np.zeros((len(groups), weights.shape[1]))
    np.add.at(per_group, group_idx, weights)
    total = per_group.sum(axis=0)
    present = total > 0
    touch = _touching(df, margin) if by == "region" and len(df) <= 6000 else None
    rng = np.random.default_rng(seed)
    best, best_score = None, np.inf
    for _ in range(max(1, trials)):
        order = rng.permutation(len(groups))
        chosen, acc = [], np.zeros_like(total)
        for g in order:
            if len(chosen) >= len(groups) - 1:
                break
            share = acc[present].sum() / max(total[present].sum(), 1)
            if chosen and share >= val_fraction:
                break
            chosen.append(g)
            acc = acc + per_group[g]
        val = np.isin(group_idx, chosen)
        lost = touch[:, val].any(axis=1) & ~val if touch is not None else np.zeros(len(df), bool)
        v, t = weights[val].sum(0)[present], weights[~val & ~lost].sum(0)[present]
        frac = v / np.maximum(v + t, 1)
        # a class missing on either side is the worst outcome; then closeness to the target; then lost pixels
        score = (np.abs(frac - val_fraction).sum() + 10 * np.sum((v == 0) | (t == 0))
                 + weights[lost].sum() / max(weights.sum(), 1))
        if score < best_score:
            best, best_score = list(chosen), score
    val_mask = np.isin(group_idx, best)
    df[SPLIT_COLUMN] = np.where(val_mask, "val", "train")
    if by == "region":
        near = (touch if touch is not None else _touching(df, margin))[:, val_mask].any(axis=1) & ~val_mask
        df.loc[near, SPLIT_COLUMN] = "excluded"
    return df


def _touching(df: pd.DataFrame, margin: float = 0.0) -> np.ndarray:
    """``(n, n)`` bool: tiles of the same slide that overlap, touch or lie within ``margin`` level-0 px."""
    x0, y0 = df["x"].to_numpy(float), df["y"].to_numpy(float)
    x1, y1 = x0 + df["w"].to_numpy(float), y0 + df["h"].to_numpy(float)
    slide = pd.factorize(df["slide"])[0]
    return ((x0[:, None] <= x1[None] + margin) & (x0[None] <= x1[:, None] + margin)
            & (y0[:, None] <= y1[None] + margin) & (y0[None] <= y1[:, None] + margin)
            & (slide[:, None] == slide[None]))



# ----------------------------------------------------------------------------- held-out pixels
def _block_grid(x: float, y: float, w: float, h: float, shape: tuple[int, int], block_size: float):
    """Block column of each tile column and block row of each tile row (level-0 blocks of ``block_size``)."""
    th, tw = shape
    gx = ((x + (np.arange(tw) + 0.5) * w / tw) // block_size).astype(np.int64)
    gy = ((y + (np.arange(th) + 0.5) * h / th) // block_size).astype(np.int64)
    return gx, gy


def _block_draw(slide: str, gx: np.ndarray, gy: np.ndarray, seed: int) -> np.ndarray:
    """Uniform 0..1 draw of each block ``(gy[:, None], gx[None, :])``: a hash of (slide, block, seed)."""
    import zlib

    salt = (zlib.crc32(str(slide).encode()) + 7919 * int(seed)) % 2**31
    hx = (gx * 73856093) % 2**31
    hy = (gy * 19349663) % 2**31
    key = (hy[:, None] ^ hx[None, :] ^ salt).astype(np.uint64)
    key = (key * np.uint64(2654435761)) % np.uint64(2**32)  # Knuth multiplicative hash
    return key.astype(np.float64) / 2**32


def holdout_blocks(slide: str, x: int, y: int, w: int, h: int, shape: tuple[int, int], block_size: float,
                   val_fraction: float, seed: int = 0, extra=None) -> np.ndarray:
    """Boolean ``shape`` mask of a tile's pixels that lie in held-out (validation) blocks.

    The slide is cut into square blocks of ``block_size`` level-0 pixels; a block is held
    out when a hash of (slide, block, seed) falls below ``val_fraction``, or when it is one
    of ``extra`` (``(column, row)`` blocks of this slide, :func:`split_pixels`' top-up for
    rare classes). The draw depends on level-0 coordinates only, so overlapping tiles agree
    on every pixel.
    """
    gx, gy = _block_grid(x, y, w, h, shape, block_size)
    held = _block_draw(slide, gx, gy, seed) < val_fraction
    for bx, by in extra or ():
        held[np.ix_(gy == by, gx == bx)] = True
    return held


def _block_counts(df: pd.DataFrame, read_label, block_size: float,
                  n_classes: int | None = None) -> dict[tuple[str, int, int], np.ndarray]:
    """Labelled pixels per class of every block holding any: ``{(slide, column, row): counts}``.

    Overlapping tiles count each block's pixels once: the tile that sees most of it.
    """
    counts: dict[tuple[str, int, int], np.ndarray] = {}
    for r in df.to_dict("records"):
        lab = np.asarray(read_label(r["label_path"]))
        gx, gy = _block_grid(r["x"], r["y"], r["w"], r["h"], lab.shape[:2], block_size)
        nc = int(n_classes or max(int(lab.max()), 1))
        for by in np.unique(gy):
            for bx in np.unique(gx):
                key = (str(r["slide"]), int(bx), int(by))
                part = lab[np.ix_(gy == by, gx == bx)]
                c = np.bincount(part.ravel(), minlength=nc + 1)[1:nc + 1]
                if c.any() and (key not in counts or c.sum() > counts[key].sum()):
                    counts[key] = c  # the tile that sees most of the block
    return counts


def pixel_split_blocks(df: pd.DataFrame, read_label, val_fraction: float = 0.15, block_size: float | None = None,
                       seed: int = 0, class_names: list[str] | None = None) -> pd.DataFrame:
    """The blocks ``split_by="pixels"`` will train on and hold out, without writing anything (05's preview).

    One row per block holding labelled pixels: ``slide``, ``x``, ``y``, ``w``, ``h`` (level-0
    px), ``split`` (``val`` when :func:`split_pixels` holds it out, rare-class blocks
    included, else ``train``), ``group`` = ``"pixels"`` and ``px_<class>`` (labelled pixels,
    each counted once however much the tiles overlap).
    """
    if not 0 < val_fraction < 1:
        raise ParameterError(f"val_fraction={val_fraction}: must be between 0 and 1")
    if block_size is None:
        block_size = float(np.median(df["w"])) / 4
    n = len(class_names) if class_names else None
    counts = _block_counts(df, read_label, block_size, n)
    extra = rare_class_blocks(df, read_label, val_fraction, block_size, seed, n, counts=counts)
    added = {(slide, int(bx), int(by)) for slide, blocks in extra.items() for bx, by in blocks}
    names = list(class_names or [f"class{i + 1}" for i in range(max((len(c) for c in counts.values()), default=0))])
    rows = []
    for (slide, bx, by), c in sorted(counts.items()):
        held = _block_draw(slide, np.array([bx]), np.array([by]), seed)[0, 0] < val_fraction or (slide, bx, by) in added
        row = {"slide": slide, "x": bx * block_size, "y": by * block_size, "w": block_size, "h": block_size,
               "split": "val" if held else "train", "group": "pixels"}
        row.update({f"px_{name}": int(c[i]) if i < len(c) else 0 for i, name in enumerate(names)})
        rows.append(row)
    return pd.DataFrame(rows, columns=["slide", "x", "y", "w", "h", "split", "group", *[f"px_{m}" for m in names]])


def rare_class_blocks(df: pd.DataFrame, read_label, val_fraction: float, block_size: float, seed: int = 0,
                      n_classes: int | None = None, counts: dict | None = None) -> dict[str, list[tuple[int, int]]]:
    """Blocks to hold out as well, so every labelled class reaches validation.

    The hashed draw of :func:`holdout_blocks` holds out about ``val_fraction`` of all
    labelled pixels, but a class drawn in one or two strokes can miss every held-out
    block, and then no epoch's validation sees it (05's checkpoint picks blindly for it).
    For each class whose held-out share falls below half of ``val_fraction``, blocks
    holding it are added in the order of their draw (deterministic) until its share
    reaches ``val_fraction``; overlapping tiles count each block's pixels once.

    ``counts``: the blocks' class counts when the caller has them already (:func:`_block_counts`),
    so the labels are not read again.

    Returns:
        ``{slide: [(column, row), ...]}`` of added blocks (empty when none are needed).
    """
    counts = _block_counts(df, read_label, block_size, n_classes) if counts is None else counts
    if not counts:
        return {}
    keys = sorted(counts)
    n = max(len(v) for v in counts.values())
    table = np.array([np.pad(counts[k], (0, n - len(counts[k]))) for k in keys])
    draw = np.array([_block_draw(k[0], np.array([k[1]]), np.array([k[2]]), seed)[0, 0] for k in keys])
    held = draw < val_fraction
    added: dict[str, list[tuple[int, int]]] = {}
    for c in range(n):
        total, got = table[:, c].sum(), table[held, c].sum()
        if not total or got >= 0.5 * val_fraction * total:
            continue
        for i in np.argsort(draw):
            if got >= val_fraction * total:
                break
            if not held[i] and table[i, c]:
                held[i] = True
                got += table[i, c]
                added.setdefault(keys[i][0], []).append((keys[i][1], keys[i][2]))
    return added


def split_pixels(df: pd.DataFrame, read_label, out_dir, val_fraction: float = 0.15, block_size: float | None = None,
                 seed: int = 0, class_names: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame, list]:
    """Split the labelled **pixels**, not the tiles: every labelled tile trains (``split_by="pixels"``).

    Labelled pixels inside held-out blocks (:func:`holdout_blocks`, default block side: a
    quarter tile width, level-0 px) are removed from the training labels (written to
    ``out_dir/<tile_id>-labelled.png``) and form the validation labels; nothing else is
    lost. For small annotation sets, where a tile split leaves a third of the labels unused.
    A class the hashed blocks leave out of validation gets blocks of its own
    (:func:`rare_class_blocks`); they are written to ``out_dir/val_blocks.json``.
    Each held-out pixel is validated once, in one tile, however much the tiles overlap.

    Returns:
        ``(table, val_rows, val_labels)``: the tile table with ``split`` = train, ``label_path``
        pointing at the training labels and ``px_val`` (held-out pixels); the rows of tiles
        holding held-out pixels; their held-out label arrays (0 elsewhere).
    """
    from pathlib import Path

    from helpers.io import write_image, write_json

    if not 0 < val_fraction < 1:
        raise ParameterError(f"val_fraction={val_fraction}: must be between 0 and 1")
    df = df.copy().reset_index(drop=True)
    if block_size is None:
        block_size = float(np.median(df["w"])) / 4
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, px_val, held_all = [], [], []
    cols = [f"px_{n}" for n in (class_names or []) if f"px_{n}" in df.columns]
    extra = rare_class_blocks(df, read_label, val_fraction, block_size, seed, len(class_names) if class_names else None)
    write_json({k: [list(b) for b in v] for k, v in extra.items()}, out_dir / VAL_BLOCKS, overwrite=True, indent=None)
    for i, r in enumerate(df.to_dict("records")):
        lab = read_label(r["label_path"])
        held = holdout_blocks(r["slide"], r["x"], r["y"], r["w"], r["h"], lab.shape[:2], block_size, val_fraction, seed,
                              extra.get(str(r["slide"])))
        held &= lab > 0
        train = np.where(held, 0, lab).astype(np.uint8)
        path = out_dir / f"{r['tile_id']}-labelled.png"
        write_image(train, path, overwrite=True)  # derived from the labels: a resumed run rewrites the same file
        paths.append(str(path))
        px_val.append(int(held.sum()))
        held_all.append(np.where(held, lab, 0).astype(np.uint8))
        for c, col in enumerate(cols):
            df.loc[i, col] = int((train == c + 1).sum())
    # overlapping tiles hold the same held-out pixels: each pixel is scored once, by the tile
    # with the most held-out pixels; tiles left with under a fifth of theirs are not validated
    claimed: dict[str, set] = {}
    val_idx, val_labels = [], []
    for i in sorted(range(len(df)), key=lambda j: -px_val[j]):
        if not px_val[i]:
            break
        r = df.iloc[i]
        lab = held_all[i]
        ds = float(r["w"]) / lab.shape[1]
        ox, oy = int(round(r["x"] / ds)), int(round(r["y"] / ds))
        yy, xx = np.nonzero(lab)
        keys = (yy + oy).astype(np.int64) * 1_000_003 + (xx + ox)
        seen = claimed.setdefault(str(r["slide"]), set())
        new = np.fromiter((k not in seen for k in keys.tolist()), bool, len(keys))
        if new.sum() < 0.2 * len(keys):
            continue
        seen.update(keys[new].tolist())
        keep = np.zeros_like(lab)
        keep[yy[new], xx[new]] = lab[yy[new], xx[new]]
        val_idx.append(i)
        val_labels.append(keep)
    df["label_path"] = paths
    df["px_val"] = px_val
    if cols:
        df["px_labelled"] = df[cols].sum(axis=1)
    df[SPLIT_COLUMN] = "train"
    df["group"] = "pixels"
    return df, df.iloc[val_idx].reset_index(drop=True), val_labels


def preview_split(workdir: str | Path, cfg, class_map: str | Path | None = None,
                  use_saved: bool = True) -> pd.DataFrame:
    """The train/val/excluded split :func:`helpers.train.train_model` will use (same seed), without training.

    A resumed run keeps the split saved in ``model/split.csv`` (``use_saved``). With
    ``split_by="pixels"`` every tile trains; the rows are then the blocks of labelled
    pixels, each marked train or val (:func:`pixel_split_blocks`). ``cfg`` is a
    :class:`helpers.train.TrainConfig`.
    """
    from helpers.config import load_class_map
    from helpers.dataset import read_label_tile, read_tiles
    from helpers.steps import step_dir

    cmap = load_class_map(class_map) if class_map else load_class_map()
    df, _ = read_tiles(workdir, cmap)
    if cfg.split_by == "pixels":  # deterministic from the labels and the seed: nothing saved to reuse
        return pixel_split_blocks(df, read_label_tile, cfg.val_fraction, cfg.block_size, cfg.seed, cmap.names)
    saved = step_dir(workdir, "model") / "split.csv"
    if use_saved and saved.is_file():
        return pd.read_csv(saved)
    return split_tiles(df, cfg.val_fraction, cfg.split_by, cfg.block_size, cfg.seed, cmap.names, margin=cfg.split_margin)
