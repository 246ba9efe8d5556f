"""Peak memory of slide inference on a 10,000^2 and a 40,000^2 px slide.

Target: the larger slide (16x the pixels) peaks at less than 1.5x the smaller one's RSS,
i.e. memory is bounded by the tile/band buffers, not by the slide size.

Usage::

    python -m benchmarks.bench_memory [--sizes 10000 40000] [--tile 1024] [--model-mpp 1.0]
                                      [--phases predict export] [--workdir DIR]

Each (slide, phase) runs in its own subprocess which reports its peak RSS (``VmHWM``
from ``/proc/self/status``: Linux carries ``ru_maxrss`` over from the parent across
fork/exec, so it would include the parent's slide generation) and, sampled every 0.1 s
with psutil, its peak *anonymous* memory (RSS minus file-backed pages: the memory-mapped probability file is
paged in and out by the OS and is counted in RSS while resident).

Phases: ``predict`` = :func:`helpers.predict.predict_slide` (reading, tiling, model,
blending, ``probabilities.tiff``); ``export`` = :func:`helpers.export.export_prediction`
(post-processing, labels TIFF, GeoJSON, overlay). An export whose rough upper bound
(the uint8 label image a few times over plus band buffers) exceeds half the available
RAM is skipped and reported, so the benchmark cannot push the machine into the OOM killer.
Each child also reports ``checkpoints``: ``VmHWM`` before/after each step (model load,
tissue mask, first and last band, probabilities TIFF, post-processing, labels TIFF,
GeoJSON tracing, overlay), i.e. which step set the peak.

Documented choices, to keep the 40,000^2 run within minutes on 2 shared cores: overlap
1, a tiny untrained model with the project's input/output contract (two convolutions, 4
softmax channels; the U-Net's activation memory is per batch and the same for both
slides), 1024 px tiles, batch 2, model resolution 2 um/px (slide 0.5 um/px: rasters of
2,500^2 and 10,000^2 px, still 16x apart; ``--model-mpp 1`` is the training default
and takes about 4x longer), no stain normalizer. Peak RSS includes the ~0.6 GB of
TensorFlow's import, the same for both slides. Slides are the synthetic mosaic of real tumour tiles of ``bench_inference``
(written once, tile by tile; ~1 minute for 40,000^2).

Session 13 (2026-12-02, load 8-10, defaults, 3 runs): predict 1,010-1,016 -> 1,313-1,332 MB
(1.30-1.31x) with the blending buffer one tile tall (it had been one band taller since session 4
for full model batches across band ends: 1.44-1.51x).

Measured 2026-11-30 (2 shared cores, load average 15-22, defaults): predict 1,015 -> 1,345
MB (1.32x, target met); export 293 -> 293 MB (1.00x, target met; was 294 -> 654 MB, 2.22x,
measured the same day on the same slides). The export's former growth was the GeoJSON's
largest region (the untrained benchmark model's 'Other' class, one region spanning the
slide: 561,848 vertices and 54,939 holes at 40k): it is now assembled without being held
whole (:mod:`helpers.outlines`: holes spooled to disk as found, only the exterior above
the current seam kept), so the GeoJSON step no longer sets the peak (40k: post-processing's
band buffers, 10k: the overlay).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_FACTOR = 1.5


def _vm_hwm_kb() -> float:
    """Peak RSS of this process image (``VmHWM``; unlike ``ru_maxrss`` it is not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _child(phase: str, slide: str, model_dir: str, out_dir: str, tile: int) -> None:
    """Run one phase and print ``{"peak_rss_mb", "peak_anon_mb", "seconds"}`` as JSON (subprocess side)."""
    import psutil

    proc = psutil.Process()
    peak = {"anon": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            m = proc.memory_info()
            peak["anon"] = max(peak["anon"], m.rss - getattr(m, "shared", 0))
            time.sleep(0.1)

    threading.Thread(target=sample, daemon=True).start()
    logging.basicConfig(level=logging.WARNING)
    from helpers.export import export_prediction
    from helpers.predict import predict_slide

    checkpoints = _instrument()

    base = _vm_hwm_kb() / 1024
    t0 = time.perf_counter()
    extra: dict = {}
    if phase == "predict":
        res = predict_slide(slide, model_dir, out_dir, overlap=1, blend="mean", tile_size=tile, batch_size=2,
                            normalizer=None, overwrite=True, progress=False)
        extra = {"raster_px": f"{res.width}x{res.height}", "tiles": res.tiles_tissue}
    else:
        export_prediction(out_dir, overwrite=True)
    dt = time.perf_counter() - t0
    stop.set()
    print(json.dumps({"peak_rss_mb": round(_vm_hwm_kb() / 1024, 1),
                      "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "peak_anon_mb": round(peak["anon"] / 2**20, 1), "import_rss_mb": round(base, 1),
                      "seconds": round(dt, 1), **extra, "checkpoints": checkpoints}))


def _vm_kb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1])
    return 0.0


def _instrument() -> dict:
    """Wrap the steps of slide inference to record how far each pushed the peak (``VmHWM``).

    Returns a dict filled while the phase runs: ``{step: {"hwm_before", "hwm_after",
    "rss_after"}}`` in MB (the first call of each step; ``band0`` / ``band_last`` after the
    first and last predicted band). A step that raised the peak is a contributor to it.
    """
    import helpers.export as export
    import helpers.postprocess as pp
    import helpers.predict as predict
    import helpers.qupath as qupath
    import helpers.viz as viz

    marks: dict = {}

    def wrap(mod, name: str, label: str) -> None:
        fn = getattr(mod, name)

        def inner(*a, **k):
            before = _vm_kb("VmHWM") / 1024
            out = fn(*a, **k)
            marks.setdefault(label, {"hwm_before": round(before, 1), "hwm_after": round(_vm_kb("VmHWM") / 1024, 1),
                                     "rss_after": round(_vm_kb("VmRSS") / 1024, 1)})
            return out

        setattr(mod, name, inner)

    wrap(predict, "load_model_and_classes", "load_model")
    wrap(predict, "slide_tissue_mask", "tissue_mask")
    wrap(pp, "postprocess_labels", "postprocess_labels")
    wrap(predict, "write_raster", "write_raster")  # predict: probabilities.tiff
    wrap(export, "write_raster", "write_raster")  # export: labels.tiff (one phase per child process)
    wrap(qupath, "write_features_stream", "trace_and_write_geojson")
    wrap(viz, "overlay_picture", "overlay_picture")

    def band_done(band: int) -> None:
        key = "band0" if band == 0 else "band_last"
        marks[key] = {"band": band, "hwm": round(_vm_kb("VmHWM") / 1024, 1), "rss": round(_vm_kb("VmRSS") / 1024, 1)}

    predict._band_done = band_done
    return marks


def _run_child(phase: str, slide: Path, model_dir: Path, out_dir: Path, tile: int, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--child", phase, str(slide), str(model_dir), str(out_dir),
           str(tile)]
    env = {**os.environ, "SM_FRAMEWORK": "tf.keras", "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {p.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


def _export_once(model_dir: Path, tile: int) -> None:
    """Export the model to ONNX before measuring, in a subprocess: the one-off export is not charged to a slide."""
    code = ("from helpers.model import load_trained; from helpers.runtime import make_predictor; "
            f"m, p = load_trained({str(model_dir)!r}); make_predictor(m, {str(model_dir)!r}, p['model_file'], tile={tile})")
    subprocess.run([sys.executable, "-c", code], check=False, cwd=str(ROOT))


def _export_need_gb(size: int, model_mpp: float, slide_mpp: float = 0.5, n_cls: int = 4) -> float:
    """Rough upper bound of the export's memory: the uint8 label image a few times over, plus bands."""
    side = size * slide_mpp / model_mpp
    return (side * side * 4 + side * 512 * n_cls * 4 * 3) / 2**30


def run(sizes: tuple[int, ...] = (10_000, 40_000), tile: int = 1024, model_mpp: float = 2.0,
        phases: tuple[str, ...] = ("predict", "export"), workdir: Path | None = None,
        timeout: float = 1800.0) -> dict:
    """Make the slides and the tiny model, measure each (size, phase) in a subprocess."""
    from benchmarks.bench_inference import machine

    mach = machine()
    tmp = Path(workdir or tempfile.mkdtemp(prefix="bench_memory_"))
    try:
        return _measure(tmp, sizes, tile, model_mpp, phases, timeout, mach)
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)


def _measure(tmp: Path, sizes: tuple[int, ...], tile: int, model_mpp: float, phases: tuple[str, ...],
             timeout: float, mach: dict) -> dict:
    import psutil

    from benchmarks.bench_inference import make_model_dir, make_slide

    model_dir = make_model_dir(tmp, "tiny", tile=tile, mpp=model_mpp, normalizer=False)
    _export_once(model_dir, tile)
    results: dict[int, dict[str, dict]] = {}
    for size in sizes:
        t0 = time.perf_counter()
        slide = make_slide(tmp / "slides" / f"mosaic{size}.tiff", size)
        print(f"slide {size}x{size}: ready in {time.perf_counter() - t0:.0f} s", flush=True)
        out_dir = tmp / "predictions" / slide.stem
        results[size] = {}
        for phase in phases:
            if phase == "export":
                need = _export_need_gb(size, model_mpp)
                avail = psutil.virtual_memory().available / 2**30
                if need > avail / 2:
                    results[size][phase] = {"error": f"skipped: export may need ~{need:.1f} GB; "
                                                     f"{avail:.1f} GB available"}
                    print(f"  {phase}: {results[size][phase]['error']}", flush=True)
                    continue
                if "error" in results[size].get("predict", {}):
                    results[size][phase] = {"error": "skipped: predict failed"}
                    continue
            r = _run_child(phase, slide, model_dir, out_dir, tile, timeout)
            results[size][phase] = r
            print(f"  {phase}: {r}", flush=True)
    figures: dict = {"tile": tile, "model_mpp": model_mpp, "overlap": 1}
    for size, per in results.items():
        for phase, r in per.items():
            key = f"{phase}_{size // 1000}k"
            figures[key] = r.get("error") or f"peak RSS {r['peak_rss_mb']:.0f} MB, anon {r['peak_anon_mb']:.0f} MB, {r['seconds']:.0f} s"
    if len(sizes) >= 2:
        small, large = min(sizes), max(sizes)
        for phase in phases:
            a, b = results[small].get(phase, {}), results[large].get(phase, {})
            if "peak_rss_mb" in a and "peak_rss_mb" in b:
                f_rss = b["peak_rss_mb"] / a["peak_rss_mb"]
                f_anon = b["peak_anon_mb"] / max(a["peak_anon_mb"], 1e-9)
                figures[f"{phase}_factor_rss"] = round(f_rss, 2)
                figures[f"{phase}_factor_anon"] = round(f_anon, 2)
                figures[f"{phase}_target_met"] = bool(f_rss <= TARGET_FACTOR)
            else:
                figures[f"{phase}_target_met"] = "not measured"
    figures.update({"target_factor": TARGET_FACTOR, "cores": mach["cores"], "cpu": mach["cpu"]})
    load = f"{os.getloadavg()[0]:.1f}"
    figures["targets"] = [
        {"target": "P3", "case": f"{phase}: peak RSS {max(sizes) // 1000}k / {min(sizes) // 1000}k slide",
         "value": figures.get(f"{phase}_factor_rss", ""), "threshold": f"<= {TARGET_FACTOR}",
         "met": figures[f"{phase}_target_met"] if isinstance(figures.get(f"{phase}_target_met"), bool) else None,
         "load": load, "note": f"{figures.get(f'{phase}_{min(sizes) // 1000}k', '')} -> "
                               f"{figures.get(f'{phase}_{max(sizes) // 1000}k', '')}"}
        for phase in phases] if len(sizes) >= 2 else []
    print(json.dumps(figures, indent=1))
    return figures


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point (``make bench`` calls it without arguments)."""
    argv = argv if argv is not None else ([] if __name__ != "__main__" else sys.argv[1:])
    if argv and argv[0] == "--child":
        _child(argv[1], argv[2], argv[3], argv[4], int(argv[5]))
        return {}
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000], help="slide sides in level-0 px")
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--model-mpp", type=float, default=2.0, help="model resolution (slide is 0.5 um/px)")
    ap.add_argument("--phases", nargs="+", default=["predict", "export"], choices=["predict", "export"])
    ap.add_argument("--workdir", default=None, help="keep slides and outputs here (reused when present)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per (slide, phase)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return run(tuple(args.sizes), args.tile, args.model_mpp, tuple(args.phases),
               Path(args.workdir) if args.workdir else None, args.timeout)


if __name__ == "__main__":
    main()
