"""Slide inference end to end versus the model's forward pass alone, per overlap, and the CPU runtimes compared.

Targets (issue 17): P1 end-to-end throughput (reading, stain normalization, blending,
post-processing and export included) at least 85% of model-only throughput at overlap 1,
4 and 16; P7 model-only tiles/s of the runtime in use within 10% of the fastest runtime
measured in the same run.

Usage::

    python -m benchmarks.bench_inference [--sizes 4096 16384] [--overlaps 1 4 16] [--runtime auto]

Set-up (documented choices):

* **Slide**: a synthetic pyramidal TIFF (``size`` x ``size`` px at 0.5 um/px) whose tissue
  is a mosaic of the four real Kather tumour tiles in ``../shared/data/stain/``
  (real H&E pixels, so the tissue detector and the stain normalizer do real work),
  inside an ellipse of glass (tiles on glass are skipped, as on a real slide).
* **Model**: the project's U-Net (``efficientnetb0``, random weights: speed does not
  depend on the weights), trained resolution 1 um/px, tile 256, saved as a model folder
  with ``training_params.yaml`` like 05 writes, and a Macenko normalizer fitted to a
  real tile, so inference normalizes every tile as in the real pipeline.
* **Runtimes** (P7): Keras, ONNX Runtime, OpenVINO float32 and OpenVINO bfloat16 (its CPU
  default on bf16-capable CPUs; reported, not equivalent) on the same batch of 8 tiles,
  in interleaved rounds (median), so each gets the same share of a shared machine.
* **End to end** (P1) = :func:`helpers.predict.predict_slide` + :func:`helpers.export.export_prediction`
  (labels TIFF, QuPath GeoJSON, overlay, summary), model loading included, with the
  runtime ``auto`` picks. **Model only** = the same number of tiles, already in memory,
  through the same runtime in batches of the same size (one warm-up batch excluded).
  ``seconds_by_part`` is predict_slide's breakdown (setup, split into setup_model =
  training parameters and, on the Keras path only, the Keras model; setup_tissue = tissue
  mask and tile grid; setup_normalizer = the slide's stain estimate; setup_session = the
  wait for the runtime, which is built (exporting ONNX first when the export is stale) in a
  second thread during the tissue mask and the stain estimate; read and normalize run in the
  reading thread, overlapped with the model; wait = the model loop waiting for tiles;
  blend; write = finished rows to disk; pyramid = probabilities.tiff) plus the export
  (export = its wall clock, imports included; export_labels = post-processing and
  labels.tiff; export_geojson; export_overlay = thumbnail and overlay.png;
  export_summary).
* Wall clock is only trustworthy on a quiet machine: when the load average exceeds the
  cores, ``wall_reliable`` is False; ``ratio_cpu`` (tiles per process-CPU second) is given too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STAIN_TILES = ROOT.parent / "shared" / "data" / "stain"
TARGET_RATIO = 0.85


# ----------------------------------------------------------------------------- fixtures (shared with bench_memory)
def mosaic_source(size: int, seed: int = 0):
    """``read_tile(x, y, w, h)`` of a ``size``^2 slide: real tumour tiles inside an ellipse of glass."""
    import imageio.v3 as iio

    tiles = sorted(STAIN_TILES.glob("TUM-*.png"))
    if not tiles:
        raise FileNotFoundError(f"{STAIN_TILES}: the real stain tiles (TUM-*.png) are needed; see ../shared/data/README.md")
    imgs = [np.asarray(iio.imread(p))[..., :3] for p in tiles]
    s = min(min(i.shape[:2]) for i in imgs)
    imgs = [i[:s, :s] for i in imgs]
    # 2x2 mosaic with flips so the period is 2s and neighbouring tiles differ
    block = np.concatenate([np.concatenate([imgs[0], imgs[1][:, ::-1]], 1),
                            np.concatenate([imgs[2][::-1], imgs[3 % len(imgs)]], 1)], 0)
    period = block.shape[0]
    cx = cy = size / 2
    rx, ry = size * 0.46, size * 0.40

    def read_tile(x: int, y: int, w: int, h: int) -> np.ndarray:
        ys = (np.arange(y, y + h) % period)[:, None]
        xs = (np.arange(x, x + w) % period)[None, :]
        out = block[ys, xs]
        yy = (np.arange(y, y + h)[:, None] - cy) / ry
        xx = (np.arange(x, x + w)[None, :] - cx) / rx
        glass = yy**2 + xx**2 > 1.0
        out[glass] = 242
        return out

    return read_tile


def make_slide(path: Path, size: int, mpp: float = 0.5) -> Path:
    """Write the synthetic mosaic slide (pyramidal JPEG TIFF OpenSlide reads) if missing."""
    from helpers.rasters import write_pyramid_tiff

    if path.is_file():
        return path
    return write_pyramid_tiff(path, mosaic_source(size), width=size, height=size, channels=3, kind="rgb", mpp=mpp,
                              tile=256)


def machine() -> dict:
    from benchmarks.run_all import print_machine

    return print_machine()


def make_model_dir(workdir: Path, kind: str = "unet", tile: int = 256, mpp: float = 1.0,
                   normalizer: bool = True) -> Path:
    """A model folder like 05 writes: ``best.keras`` + ``training_params.yaml`` (+ stain normalizer).

    Args:
        workdir: Folder receiving ``model/`` (and ``stain/normalizer.json``).
        kind: ``"unet"`` (the project's U-Net, random weights) or ``"tiny"`` (two
            convolutions, same input/output contract; for the memory benchmark).
        tile: Training tile size recorded in the parameters.
        mpp: Model resolution recorded in the parameters.
        normalizer: Fit a Macenko normalizer on a real tile and record it.
    """
    import keras
    import yaml

    from helpers.config import load_class_map

    cmap = load_class_map()
    model_dir = workdir / "model"
    if (model_dir / "best.keras").is_file():
        return model_dir
    model_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(0)
    if kind == "unet":
        from helpers.model import build_model

        model = build_model(cmap.n_classes, encoder_weights=None)
    else:
        inp = keras.Input((None, None, 3))
        x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
        out = keras.layers.Conv2D(cmap.n_classes, 1, activation="softmax")(x)
        model = keras.Model(inp, out)
    model.save(model_dir / "best.keras")
    params = {"mpp": mpp, "tile_size": tile, "classes": cmap.to_dict()["classes"], "model_file": "best.keras"}
    if normalizer:
        import imageio.v3 as iio

        from helpers.stain import fit_normalizer

        ref = sorted(STAIN_TILES.glob("TUM-*.png"))[0]
        fit_normalizer(np.asarray(iio.imread(ref))[..., :3].copy(), "macenko", reference_source=ref.name).save(
            workdir / "stain" / "normalizer.json", overwrite=True)
        params["normalizer"] = "stain/normalizer.json"
    (model_dir / "training_params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return model_dir


# ----------------------------------------------------------------------------- measurement
def runtime_predictors(model_dir: Path, tile: int, batch: int) -> dict:
    """Every runtime this machine has for the model folder: ``{name: (predict, equivalent)}``.

    ``openvino-bf16`` (OpenVINO's own CPU default on bf16-capable CPUs) is measured for
    reference only: it is not equivalent to Keras (see :mod:`helpers.runtime`).
    """
    from helpers.model import load_trained
    from helpers.runtime import (ONNX_FILE, current_export, export_onnx, installed, keras_predict_fn,
                                 openvino_predict_fn, ort_predict_fn)

    model, params = load_trained(model_dir)
    n_cls = int(model.output_shape[-1])
    record = current_export(model_dir, params["model_file"]) or export_onnx(model, params["model_file"], model_dir,
                                                                             tile=tile, overwrite=True)
    checks = record.get("checks", {})
    onnx = model_dir / ONNX_FILE
    out = {"keras": (keras_predict_fn(model, batch, tile, n_cls), True)}
    if installed("onnxruntime"):
        out["onnxruntime"] = (ort_predict_fn(onnx, batch, tile, n_cls), bool(checks.get("onnxruntime", {}).get("equivalent")))
    if installed("openvino"):
        out["openvino"] = (openvino_predict_fn(onnx, batch, tile, n_cls), bool(checks.get("openvino", {}).get("equivalent")))
        bf16 = openvino_predict_fn(onnx, batch, tile, n_cls, precision="bf16")
        out["openvino-bf16"] = (bf16, False)
    return out


def compare_runtimes(model_dir: Path, tiles: np.ndarray, tile: int, batch: int, rounds: int = 5,
                     calls: int = 2) -> dict[str, dict]:
    """Model-only tiles/s of every runtime, measured in interleaved rounds (median), on the same batch.

    Interleaving gives every runtime the same share of a shared machine's load.
    """
    preds = runtime_predictors(model_dir, tile, batch)
    x = np.ascontiguousarray(np.resize(tiles, (batch,) + tiles.shape[1:]))
    ref = preds["keras"][0](x)
    rates: dict[str, list[float]] = {k: [] for k in preds}
    for fn, _ in preds.values():
        fn(x)  # warm-up
    for _ in range(rounds):
        for name, (fn, _) in preds.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(x)
            rates[name].append(calls * batch / (time.perf_counter() - t0))
    out = {}
    for name, (fn, equivalent) in preds.items():
        got = fn(x)
        out[name] = {"tiles_per_s": round(float(np.median(rates[name])), 2), "equivalent": equivalent,
                     "max_abs_diff": float(np.abs(got - ref).max()),
                     "argmax_agreement": round(float((got.argmax(-1) == ref.argmax(-1)).mean()), 6)}
    return out


def model_only(predict, n_tiles: int, batch: int, tiles: np.ndarray) -> tuple[float, float]:
    """``(tiles per wall second, tiles per CPU second)`` of the runtime alone on ``n_tiles`` in-memory tiles."""
    x = np.ascontiguousarray(np.resize(tiles, (batch,) + tiles.shape[1:]))
    predict(x)  # warm-up: first-call allocation, excluded as for a long slide run
    n_batches = max(1, int(np.ceil(n_tiles / batch)))
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n_batches):
        predict(x)
    n = n_batches * batch
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def sample_tiles(slide_path: Path, tile: int, ds: float, n: int = 16) -> np.ndarray:
    """``n`` tissue tiles read from the slide (inputs for the model-only run)."""
    from helpers.slides import open_slide

    with open_slide(slide_path) as s:
        w, h = s.dimensions
        out = []
        for i in range(n):
            x = int(w * (0.3 + 0.4 * (i % 4) / 3))
            y = int(h * (0.3 + 0.4 * (i // 4 % 4) / 3))
            out.append(s.read(x, y, tile, tile, ds))
    return np.stack(out)


def one_case(tmp: Path, size: int, overlap: int, tile: int, batch: int, normalizer: bool, runtime: str,
             mach: dict) -> dict:
    """predict_slide + export_prediction on one slide at one overlap, then model-only on as many tiles."""
    from helpers.export import export_prediction
    from helpers.model import load_trained
    from helpers.predict import predict_slide
    from helpers.runtime import make_predictor

    slide = make_slide(tmp / "slides" / f"mosaic{size}.tiff", size)
    model_dir = make_model_dir(tmp, "unet", tile=tile)
    out_dir = tmp / "predictions" / f"{slide.stem}_o{overlap}"
    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    res = predict_slide(slide, model_dir, out_dir, overlap=overlap, blend="mean", batch_size=batch,
                        normalizer="auto" if normalizer else None, overwrite=True, progress=False, runtime=runtime)
    t_pred = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = export_prediction(out_dir, overwrite=True)
    t_export = time.perf_counter() - t0
    e2e_s, e2e_cpu = t_pred + t_export, time.process_time() - c0
    n = int(res.tiles_tissue)
    model, params = load_trained(model_dir)
    pred = make_predictor(model, model_dir, params["model_file"], runtime=runtime, batch_size=batch, tile=tile)
    mo, mo_c = model_only(pred, n, batch, sample_tiles(slide, tile, res.downsample))
    load1 = os.getloadavg()[0]
    parts = dict(res.extra.get("seconds_by_part", {}))
    parts["export"] = round(t_export, 3)
    parts.update({f"export_{k}": v for k, v in summary.get("seconds_by_part", {}).items()})
    ratio = (n / e2e_s) / mo
    fig = {"slide": size, "overlap": overlap, "runtime": res.extra.get("runtime"), "tiles": n,
           "end_to_end_tiles_per_s": round(n / e2e_s, 2), "model_only_tiles_per_s": round(mo, 2),
           "ratio_wall": round(ratio, 3), "ratio_cpu": round((n / e2e_cpu) / mo_c, 3),
           "loop_ratio": round(float(res.tiles_per_second) / mo, 3), "seconds_by_part": parts,
           "load": f"{load0:.1f}->{load1:.1f}", "wall_reliable": bool(max(load0, load1) <= mach["cores"] + 1)}
    print(f"slide {size}^2 overlap {overlap:>2} [{fig['runtime']}]: {n} tiles, end-to-end {n / e2e_s:.2f} vs model-only "
          f"{mo:.2f} tiles/s = {100 * ratio:.1f}% (CPU-time {100 * fig['ratio_cpu']:.1f}%), load {fig['load']}; "
          f"seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()), flush=True)
    return fig


def run(sizes: tuple[int, ...] = (4096,), overlaps: tuple[int, ...] = (1, 4, 16), tile: int = 256, batch: int = 8,
        workdir: Path | None = None, normalizer: bool = True, runtime: str = "auto") -> dict:
    """Build the fixtures, compare the runtimes, run every (size, overlap); print and return figures and targets."""
    mach = machine()
    tmp = Path(workdir or tempfile.mkdtemp(prefix="bench_inference_"))
    try:
        model_dir = make_model_dir(tmp, "unet", tile=tile)
        slide = make_slide(tmp / "slides" / f"mosaic{min(sizes)}.tiff", min(sizes))
        load0 = os.getloadavg()[0]
        rts = compare_runtimes(model_dir, sample_tiles(slide, tile, 2.0), tile, batch)
        load1 = os.getloadavg()[0]
        for name, r in rts.items():
            print(f"model only, {name:<14} {r['tiles_per_s']:6.2f} tiles/s  max |diff| vs keras {r['max_abs_diff']:.2g}"
                  f"  argmax agreement {r['argmax_agreement']:.5f}{'' if r['equivalent'] else '  (NOT equivalent)'}")
        from helpers.model import load_trained
        from helpers.runtime import make_predictor

        m, p = load_trained(model_dir)
        in_use = make_predictor(m, model_dir, p["model_file"], runtime=runtime, batch_size=batch, tile=tile).runtime
        eq = {k: v["tiles_per_s"] for k, v in rts.items() if v["equivalent"]}
        fastest_eq = max(eq, key=eq.get)
        fastest = max(rts, key=lambda k: rts[k]["tiles_per_s"])
        p7 = rts[in_use]["tiles_per_s"] / rts[fastest_eq]["tiles_per_s"]
        load = f"{load0:.1f}->{load1:.1f}"
        targets = [{"target": "P7", "case": f"runtime in use ({in_use}) vs fastest equivalent ({fastest_eq})",
                    "value": round(p7, 3), "threshold": ">= 0.90", "met": bool(p7 >= 0.9), "load": load},
                   {"target": "P7", "case": f"runtime in use ({in_use}) vs fastest measured ({fastest})",
                    "value": round(rts[in_use]["tiles_per_s"] / rts[fastest]["tiles_per_s"], 3), "threshold": ">= 0.90",
                    "met": bool(rts[in_use]["tiles_per_s"] >= 0.9 * rts[fastest]["tiles_per_s"]), "load": load,
                    "note": "" if rts[fastest]["equivalent"] else f"{fastest} is not equivalent to Keras"},
                   {"target": "P7", "case": f"speed-up of {in_use} over keras",
                    "value": round(rts[in_use]["tiles_per_s"] / rts["keras"]["tiles_per_s"], 2), "threshold": "info",
                    "met": None, "load": load}]
        cases = []
        for size in sizes:
            for overlap in overlaps:
                f = one_case(tmp, size, overlap, tile, batch, normalizer, runtime, mach)
                cases.append(f)
                targets.append({"target": "P1", "case": f"{size}^2 overlap {overlap} ({f['runtime']})",
                                "value": f["ratio_wall"], "threshold": f">= {TARGET_RATIO}",
                                "met": bool(f["ratio_wall"] >= TARGET_RATIO), "load": f["load"],
                                "note": f"CPU-time ratio {f['ratio_cpu']}" + ("" if f["wall_reliable"] else
                                                                             "; wall clock unreliable (load > cores)")})
        return {"runtimes": rts, "cases": cases, "targets": targets, "cores": mach["cores"], "cpu": mach["cpu"]}
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point (``make bench`` calls it without arguments)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096], help="slide sides in level-0 px (0.5 um/px)")
    ap.add_argument("--overlaps", type=int, nargs="+", default=[1, 4, 16], choices=(1, 4, 16))
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runtime", default="auto", help="auto, onnxruntime, openvino or keras")
    ap.add_argument("--workdir", default=None, help="keep fixtures and outputs here (default: a temporary folder)")
    ap.add_argument("--no-normalizer", action="store_true", help="skip stain normalization (to see its share)")
    args = ap.parse_args(argv if argv is not None else ([] if __name__ != "__main__" else None))
    os.environ.setdefault("SM_FRAMEWORK", "tf.keras")
    logging.basicConfig(level=logging.WARNING)
    res = run(tuple(args.sizes), tuple(args.overlaps), args.tile, args.batch,
              Path(args.workdir) if args.workdir else None, normalizer=not args.no_normalizer, runtime=args.runtime)
    print(json.dumps(res["targets"], indent=1))
    return res


if __name__ == "__main__":
    main()
    sys.exit(0)
