"""Round 2 on finished ``bench_real`` runs (issue 11): self-training with pseudo-labels, or more epochs alone.

Usage::

    python -m benchmarks.selftrain_real --from runs/bench_real --workdir runs/bench_real_st \\
        [--sources glas_colon ...] [--threshold 0.9 | --no-pseudo] [--set 05_train_model.epochs=24 ...]

Per source, the finished run ``--from/<source>`` (read only) is copied to ``--workdir/<source>``;
its ``model/`` becomes ``model_round1/``. With pseudo-labels (default),
:func:`helpers.selftrain.pseudo_label_tiles` fills the unlabelled pixels of the training tiles
where round 1's slide prediction (07) is at least ``--threshold`` confident, **only in the
training part** (left half: the held-out half gets no pseudo-label; ``--transductive``: there too,
as a user's own slide would, not a clean hold-out figure) and never in 05's validation blocks. Then 05 fine-tunes from ``model_round1`` (``init_model``) and 07 predicts again, through
:func:`helpers.pipeline.run_chain` (the notebooks' code path), and the held-out half is scored as
:mod:`benchmarks.bench_real` scores it. ``--no-pseudo`` is the control: the same extra epochs on
the annotations alone. Training CPU seconds of both rounds are printed and kept in ``bench_real.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_real import DATA, RESULTS, load_source, parse_overrides, print_table, run_source, write_csv, write_params

#: Round 2's defaults on top of the round-1 parameters (05): 24 more epochs at half the learning rate.
ROUND2 = {"epochs": 24, "learning_rate": 5e-4}
_COPY_SKIP = {"notebooks", "gif", "tta"}


def left_half(workdir: Path):
    """``allowed`` for :func:`helpers.selftrain.pseudo_label_tiles`: level-0 columns left of each image's midline."""
    from helpers.rasters import raster_info

    widths = {p.stem: int(raster_info(p)["width"]) for p in (workdir / "truth").glob("*.tiff")}

    def allowed(r: dict, shape: tuple[int, int]) -> np.ndarray:
        th, tw = shape
        cols = r["x"] + (np.arange(tw) + 0.5) * r["w"] / tw
        return np.broadcast_to(cols < widths[str(r["slide"])] // 2, (th, tw)).copy()

    return allowed


def copy_run(src_dir: Path, wd: Path) -> None:
    """Copy a finished run (not its notebooks, GIF, TTA outputs, GIF frames and 05's split labels) to ``wd``."""
    if wd.exists():
        shutil.rmtree(wd)
    wd.mkdir(parents=True)
    for p in src_dir.iterdir():
        if p.is_dir() and p.name not in _COPY_SKIP:
            shutil.copytree(p, wd / p.name, ignore=shutil.ignore_patterns("frames", "train_labels"))
        elif p.is_file():
            shutil.copy2(p, wd / p.name)


def round2(wd: Path, threshold: float | None, overrides05: dict | None = None, transductive: bool = False) -> dict:
    """Round 2 in a finished work folder: ``model/`` -> ``model_round1/``, pseudo-labels, 05 (init_model), 07.

    Args:
        wd: A bench_real work folder after 01-07 (``model/``, ``predictions/``, ``params/``).
        threshold: Pseudo-label confidence; None: no pseudo-labels (the control).
        overrides05: 05's parameters for round 2 on top of ``params/05_train_model.yaml``
            (default :data:`ROUND2`); ``init_model`` is set here.
        transductive: Pseudo-labels on every unlabelled pixel of the training tiles, the held-out half's
            included (as on a user's own slide); its held-out score is then not a clean hold-out figure.

    Returns:
        What round 2 did: pseudo-labelled pixels, its parameters, seconds and CPU seconds of both rounds.
    """
    import yaml

    from helpers.pipeline import run_chain
    from helpers.selftrain import pseudo_label_tiles

    t0 = time.perf_counter()
    p05 = yaml.safe_load((wd / "params" / "05_train_model.yaml").read_text()) or {}
    r1 = yaml.safe_load((wd / "model" / "training_params.yaml").read_text())
    if (wd / "model_round1").exists():
        shutil.rmtree(wd / "model_round1")
    shutil.move(wd / "model", wd / "model_round1")
    out: dict = {"threshold": threshold, "px_pseudo": 0, "transductive": transductive}
    if threshold is not None:  # 05's pixel split of round 1: its validation blocks get no pseudo-label
        df = pseudo_label_tiles(wd, threshold, val_fraction=p05.get("val_fraction", 0.15),
                                block_size=p05.get("block_size"), seed=int(p05.get("seed", 42)),
                                allowed=None if transductive else left_half(wd))
        out["px_pseudo"] = int(df["px_pseudo"].sum())
        px = df[[c for c in df.columns if c.startswith("px_") and c not in ("px_unlabelled", "px_pseudo")]].sum()
        out["labelled_px_after"] = int(px.sum())
    ov = {**ROUND2, **(overrides05 or {}), "init_model": str((wd / "model_round1").resolve())}
    params = write_params(wd / "params", wd / "params_round2", {"05_train_model": ov})
    load0 = os.getloadavg()[0]
    timings = dict(run_chain(wd, params, only=["05", "07"], overwrite=True))
    r2 = yaml.safe_load((wd / "model" / "training_params.yaml").read_text())
    out.update({"overrides_05": ov, "timings": timings, "load_average_start": load0,
                "round1_train_s": r1["timings"]["total_s"], "round1_train_cpu_s": r1["timings"]["total_cpu_s"],
                "round2_train_s": r2["timings"]["total_s"], "round2_train_cpu_s": r2["timings"]["total_cpu_s"],
                "seconds": time.perf_counter() - t0})
    return out


def run(src_dir: Path, wd: Path, source, cmap, threshold: float | None, overrides: dict,
        transductive: bool = False) -> list[dict]:
    """Round 2 of one finished source run, copied to ``wd``; rows of the results table (as ``bench_real``)."""
    copy_run(src_dir, wd)
    st = round2(wd, threshold, overrides.get("05_train_model"), transductive)
    info = json.loads((wd / "bench_real.json").read_text())
    info.update({"round2": st, "chain_seconds": info.get("chain_seconds", 0.0) + sum(st["timings"].values())})
    (wd / "bench_real.json").write_text(json.dumps(info, indent=1, default=str))
    print(json.dumps(st, indent=1, default=str), flush=True)
    return run_source(source, wd, wd / "params", 0, cmap, score_only=True)


def main(argv: list[str] | None = None) -> list[dict]:
    from helpers.config import load_class_map

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="src", required=True, help="finished bench_real work folder (read only)")
    ap.add_argument("--workdir", required=True, help="round-2 work folders go here, one per source")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--sources", nargs="*", default=None)
    ap.add_argument("--threshold", type=float, default=0.9, help="smallest confidence of a pseudo-label")
    ap.add_argument("--no-pseudo", action="store_true", help="control: round 2 on the annotations alone")
    ap.add_argument("--transductive", action="store_true",
                    help="pseudo-labels on the held-out half's pixels of the training tiles too (not a clean hold-out)")
    ap.add_argument("--set", nargs="*", default=[], metavar="NB.KEY=VALUE")
    ap.add_argument("--out", default=str(RESULTS.with_name("real_round2.csv")))
    args = ap.parse_args(argv)
    cmap = load_class_map()
    src_root, rows = Path(args.src), []
    names = args.sources or sorted(p.name for p in src_root.iterdir() if (p / "model" / "best.keras").is_file())
    for name in names:
        print(f"\n==== round 2 of {name} ({'control, no pseudo-labels' if args.no_pseudo else f'pseudo-labels >= {args.threshold}'})",
              flush=True)
        rows += run(src_root / name, Path(args.workdir) / name, load_source(Path(args.data), name), cmap,
                    None if args.no_pseudo else args.threshold, parse_overrides(args.set), args.transductive)
        write_csv(rows, Path(args.out))
    print_table(rows)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
