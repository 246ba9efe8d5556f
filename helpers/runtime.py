"""The inference runtime: the trained Keras model exported once to ONNX and run with OpenVINO or ONNX Runtime.

Training stays on TensorFlow/Keras. For inference (07 and 08's variants study) the model
is exported once with ``tf2onnx`` *including* :func:`helpers.model.preprocess` (the graph
takes uint8 RGB tiles ``(N, H, W, 3)`` and returns softmax probabilities), written next
to the model as ``model/model.onnx`` and recorded in ``model/model.onnx.json``: its
sha256, the sha256 of the ``.keras`` file it came from, the converter versions, and for
every installed runtime the equivalence figures measured on export (max abs difference
of the probabilities and argmax agreement with Keras on the same tiles).

:func:`make_predictor` picks the runtime: ``"auto"`` (07's and 08's default) uses the first
of OpenVINO float32 (the fastest equivalent runtime measured, 9-14 % ahead of ONNX Runtime
and Keras on a quiet 2-core machine; see ``benchmarks/bench_inference.py``) and ONNX Runtime
(both pinned dependencies) that is installed and passed the check, exporting when the export is missing or stale, else falls back to
Keras; one log line says which runtime runs and why. ``"keras"``, ``"onnxruntime"`` and
``"openvino"`` force one (a named ONNX runtime that cannot be used is a one-line error).
Equivalent means: probabilities within :data:`MAX_ABS_DIFF` (a quarter of a step of the
uint8 probabilities 07 stores) and argmax agreement at least :data:`MIN_ARGMAX_AGREEMENT`.
OpenVINO runs in float32: its CPU default on bf16-capable CPUs is bfloat16, about 1.7x
faster but measured 0.18-0.36 max abs difference and 99.6-99.7% argmax agreement on two
trained models, so it is not equivalent. It is offered only when asked for
(``"openvino-bf16"``, never picked by ``"auto"``): the export records its figures against
Keras as information, and the predictor says which precision the CPU actually runs (a CPU
without bfloat16 units runs float32, and the runtime is then reported as ``"openvino"``).
The same ``model.onnx`` is the file to hand to other tools (QuPath's deep-learning
extensions read ONNX).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from helpers.errors import ModelError, ParameterError, WriteError
from helpers.io import sha256_file

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
ONNX_INFO = "model.onnx.json"
RUNTIMES = ("auto", "onnxruntime", "openvino", "openvino-bf16", "keras")  # openvino-bf16: only when asked for
#: Export is accepted only when ONNX Runtime agrees with Keras this closely on the check tiles.
MAX_ABS_DIFF = 1e-3
MIN_ARGMAX_AGREEMENT = 0.999
OPSET = 17


@dataclass
class Predictor:
    """uint8 tiles ``(N, H, W, 3)`` -> float32 probabilities ``(N, H, W, C)``, and which runtime does it."""

    predict: Callable[[np.ndarray], np.ndarray]
    runtime: str  # "openvino", "onnxruntime" or "keras"
    reason: str
    onnx_sha256: str | None = None
    channels: int | None = None  # output channels when the runtime knows them without a call

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        return self.predict(tiles)


def check_tiles(tile: int, n: int = 4, seed: int = 0) -> np.ndarray:
    """Fixed uint8 tiles for the equivalence check: smooth H&E-like colour fields plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:tile, 0:tile] / max(tile, 1)
    out = np.empty((n, tile, tile, 3), np.uint8)
    for i in range(n):
        base = np.stack([np.sin(6 * xx + i) * 60 + 180, np.cos(5 * yy + 2 * i) * 70 + 120,
                         np.sin(4 * (xx + yy) + i) * 40 + 190], -1)
        out[i] = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return out


def fixed_batches(run_batch: Callable[[np.ndarray], np.ndarray], batch_size: int, tile: int,
                  n_cls: int) -> Callable[[np.ndarray], np.ndarray]:
    """Wrap a runtime that takes exactly ``batch_size`` tiles: a short last batch is padded with glass."""

    def predict(tiles: np.ndarray) -> np.ndarray:
        out = np.empty((len(tiles), tile, tile, n_cls), np.float32)
        for i in range(0, len(tiles), batch_size):
            chunk = tiles[i:i + batch_size]
            n = len(chunk)
            if n < batch_size:
                chunk = np.concatenate([chunk, np.full((batch_size - n, tile, tile, 3), 255, np.uint8)])
            out[i:i + n] = run_batch(chunk)[:n]
        return out

    return predict


def keras_predict_fn(model, batch_size: int, tile: int, n_cls: int) -> Callable[[np.ndarray], np.ndarray]:
    """The Keras path: one traced ``tf.function`` on fixed-size (padded) batches."""
    import tensorflow as tf

    from helpers.model import preprocess

    @tf.function(input_signature=[tf.TensorSpec((batch_size, tile, tile, 3), tf.uint8)], reduce_retracing=True)
    def run(x):
        return model(preprocess(x), training=False)

    return fixed_batches(lambda chunk: run(tf.constant(chunk)).numpy(), batch_size, tile, n_cls)


def ort_session(onnx: str | Path | bytes, threads: int = 0):
    """An ONNX Runtime CPU session: all graph optimizations, worker threads that sleep rather than spin.

    Spinning threads lose badly when other processes share the cores (measured: 2.4 vs
    3.1 tiles/s at load 15 on 2 cores); ``threads`` 0 = one per core.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = int(threads)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    src = onnx if isinstance(onnx, bytes) else str(onnx)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def ort_predict_fn(onnx: str | Path | bytes, batch_size: int, tile: int, n_cls: int) -> Callable[[np.ndarray], np.ndarray]:
    """The ONNX Runtime path: uint8 tiles in, probabilities out, ``batch_size`` tiles per call."""
    session = ort_session(onnx)
    name = session.get_inputs()[0].name

    def predict(tiles: np.ndarray) -> np.ndarray:
        out = np.empty((len(tiles), tile, tile, n_cls), np.float32)
        for i in range(0, len(tiles), batch_size):
            out[i:i + batch_size] = session.run(None, {name: np.ascontiguousarray(tiles[i:i + batch_size])})[0]
        return out

    last = session.get_outputs()[0].shape[-1]
    predict.channels = last if isinstance(last, int) else None  # type: ignore[attr-defined]
    return predict


def openvino_predict_fn(onnx: str | Path, batch_size: int, tile: int, n_cls: int,
                        precision: str = "f32") -> Callable[[np.ndarray], np.ndarray]:
    """The OpenVINO path: the ONNX graph compiled for ``(batch_size, tile, tile, 3)`` on the CPU (padded batches).

    ``precision`` ``"f32"`` (default, equivalent to Keras) or ``"bf16"`` (OpenVINO's own
    default on bf16-capable CPUs: faster, not equivalent; only when asked for). The compiled
    precision the CPU actually runs is ``predict.precision`` (``"f32"`` or ``"bf16"``).
    """
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(onnx))
    model.reshape([batch_size, tile, tile, 3])
    # no CPU pinning: a pinned thread waits for its own core when another process runs there, and the
    # other thread waits for it (model only, 2 cores shared with a training run, load 3.5-4.7:
    # pinned 4.9-8.9 tiles/s, unpinned 11.7-12.9, ONNX Runtime 6.3-11.9)
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision, "ENABLE_CPU_PINNING": False}
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()

    predict = fixed_batches(lambda chunk: request.infer({0: np.ascontiguousarray(chunk)})[0], batch_size, tile, n_cls)
    last = model.outputs[0].get_partial_shape()[-1]
    predict.channels = last.get_length() if last.is_static else None  # type: ignore[attr-defined]
    # what the CPU runs: a CPU without bfloat16 units ignores the bf16 hint and runs float32
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    predict.precision = getattr(hint, "get_type_name", lambda: str(hint))()  # type: ignore[attr-defined]
    return predict


#: The ONNX runtimes in order of preference (package, predictor factory): OpenVINO float32 was
#: the fastest equivalent runtime in every quiet measurement (README, "Inference runtime").
ONNX_RUNTIMES: dict[str, tuple[str, Callable]] = {
    "openvino": ("openvino", openvino_predict_fn),
    "onnxruntime": ("onnxruntime", ort_predict_fn),
}


def installed(runtime: str) -> bool:
    """True when the runtime's package imports (``keras`` always is)."""
    if runtime == "keras":
        return True
    try:
        __import__(ONNX_RUNTIMES[runtime][0])
    except ImportError:
        return False
    return True


def compare(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """``max_abs_diff`` and ``argmax_agreement`` of two probability arrays of the same shape."""
    return {"max_abs_diff": float(np.abs(reference - other).max()),
            "argmax_agreement": float((reference.argmax(-1) == other.argmax(-1)).mean())}


def check_runtime(runtime: str, onnx: str | Path, reference: np.ndarray, tiles: np.ndarray) -> dict:
    """Run ``tiles`` through an ONNX runtime and compare with Keras' ``reference`` probabilities."""
    if runtime == "openvino-bf16":
        got = openvino_predict_fn(onnx, len(tiles), tiles.shape[1], reference.shape[-1], precision="bf16")(tiles)
    else:
        _, factory = ONNX_RUNTIMES[runtime]
        got = factory(onnx, len(tiles), tiles.shape[1], reference.shape[-1])(tiles)
    figures = compare(reference, got)
    ok = figures["max_abs_diff"] <= MAX_ABS_DIFF and figures["argmax_agreement"] >= MIN_ARGMAX_AGREEMENT
    return {**figures, "equivalent": bool(ok)}


def export_onnx(model, model_file: str | Path, out_dir: str | Path, *, tile: int = 256,
                overwrite: bool = False) -> dict:
    """Export a Keras model (with its input transform) to ``out_dir/model.onnx`` and check it.

    Every installed ONNX runtime is compared with Keras on the same tiles
    (:func:`check_tiles`); the figures go to ``model.onnx.json`` under ``checks``.

    Args:
        model: The loaded Keras model.
        model_file: The ``.keras`` file it was loaded from (its sha256 is recorded).
        out_dir: The model folder receiving ``model.onnx`` and ``model.onnx.json``.
        tile: Tile side used for the equivalence check.
        overwrite: Replace an existing export.

    Returns:
        The record written to ``model.onnx.json``.

    Raises:
        ModelError: tf2onnx missing, or the conversion failed.
    """
    try:
        import tensorflow as tf
        import tf2onnx
    except ImportError as exc:
        raise ModelError(f"cannot export to ONNX: {exc.name} is not installed; pip install the project's pins") from None
    from helpers.io import write_bytes, write_json
    from helpers.model import preprocess

    out_dir = Path(out_dir)
    onnx_path = out_dir / ONNX_FILE

    @tf.function(input_signature=[tf.TensorSpec((None, None, None, 3), tf.uint8, name="tiles")])
    def run(x):
        return model(preprocess(x), training=False)

    t0 = time.perf_counter()
    try:
        proto, _ = tf2onnx.convert.from_function(run, input_signature=run.input_signature, opset=OPSET)
    except Exception as exc:  # noqa: BLE001 - any converter failure means: use Keras
        raise ModelError(f"{model_file}: ONNX export failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") \
            from None
    data = proto.SerializeToString()
    seconds = time.perf_counter() - t0
    write_bytes(data, onnx_path, overwrite=overwrite)
    x = check_tiles(tile)
    ref = run(tf.constant(x)).numpy()
    checks = {rt: check_runtime(rt, onnx_path, ref, x) for rt in ONNX_RUNTIMES if installed(rt)}
    if installed("openvino"):  # information only: never picked by "auto"
        checks["openvino-bf16"] = check_runtime("openvino-bf16", onnx_path, ref, x)
    record = {
        "onnx_file": ONNX_FILE, "onnx_sha256": hashlib.sha256(data).hexdigest(), "onnx_bytes": len(data),
        "source_file": Path(model_file).name, "source_sha256": sha256_file(model_file),
        "input": "uint8 RGB tiles (N, H, W, 3); helpers.model.preprocess is inside the graph",
        "output": "float32 softmax probabilities (N, H, W, classes)",
        "opset": OPSET, "tf2onnx": tf2onnx.__version__, "tensorflow": tf.__version__,
        "export_seconds": round(seconds, 1),
        "check_tiles": {"n": int(len(x)), "tile": int(tile), "max_abs_diff_allowed": MAX_ABS_DIFF,
                        "argmax_agreement_required": MIN_ARGMAX_AGREEMENT},
        "checks": {rt: {**c, "version": _version(rt.split("-")[0])} for rt, c in checks.items()},
    }
    write_json(record, out_dir / ONNX_INFO, overwrite=True)
    log.info("%s: exported to ONNX in %.0f s; %s", onnx_path, seconds,
             "; ".join(f"{rt}: max |diff| {c['max_abs_diff']:.2g}, argmax agreement {c['argmax_agreement']:.5f}"
                       for rt, c in checks.items()))
    return record


def _version(runtime: str) -> str:
    mod = __import__(ONNX_RUNTIMES[runtime][0])
    return str(getattr(mod, "__version__", "") or getattr(mod, "get_version", lambda: "")())


def current_export(model_dir: str | Path, model_file: str | Path) -> dict | None:
    """The ``model.onnx.json`` record if ``model.onnx`` matches it and was made from ``model_file``; else None."""
    model_dir = Path(model_dir)
    info, onnx = model_dir / ONNX_INFO, model_dir / ONNX_FILE
    if not info.is_file() or not onnx.is_file():
        return None
    try:
        record = json.loads(info.read_text())
    except (OSError, ValueError):
        return None
    if record.get("source_sha256") != sha256_file(model_file) or record.get("onnx_sha256") != sha256_file(onnx):
        log.info("%s: made from another model file or changed since; exporting again", onnx)
        return None
    if any(installed(rt) and rt not in record.get("checks", {}) for rt in ONNX_RUNTIMES):
        log.info("%s: a runtime installed since the export has not been checked; exporting again", onnx)
        return None
    return record


def make_predictor(model, model_dir: str | Path, model_file: str | Path, *, runtime: str = "auto",
                   batch_size: int = 8, tile: int = 256, n_cls: int | None = None,
                   load_model: Callable[[], Any] | None = None) -> Predictor:
    """The fastest runtime proven equivalent for a trained model, falling back to Keras.

    ``"auto"`` takes the first of :data:`ONNX_RUNTIMES` that is installed and passed the
    equivalence check recorded in ``model.onnx.json`` (exporting first when the export is
    missing or stale); otherwise Keras. One INFO line says which runtime runs and why.

    Args:
        model: The loaded Keras model (used for export and the fallback), or None to load
            it with ``load_model`` only when needed: a current export runs without
            TensorFlow or the Keras model.
        model_dir: The model folder (``model.onnx`` is kept there).
        model_file: The ``.keras`` file the model came from.
        runtime: ``"auto"``, ``"onnxruntime"``, ``"openvino"``, ``"keras"``, or ``"openvino-bf16"``
            (OpenVINO in bfloat16 where the CPU has it: faster, not equivalent; only when asked for).
        batch_size: Tiles per call.
        tile: Tile side.
        n_cls: Output channels (default: the model's).
        load_model: Returns the Keras model when ``model`` is None.

    Raises:
        ParameterError: an unknown runtime, or a named ONNX runtime that cannot be used.
    """
    if runtime not in RUNTIMES:
        raise ParameterError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")
    if model is None and load_model is None:
        raise ParameterError("make_predictor needs the Keras model or a load_model function")
    loaded = [model]

    def keras_model():
        if loaded[0] is None:
            loaded[0] = load_model()  # type: ignore[misc]
        return loaded[0]

    n_cls = int(n_cls or keras_model().output_shape[-1])

    def keras(reason: str) -> Predictor:
        log.info("inference runtime: keras (%s)", reason)
        m = keras_model()
        return Predictor(keras_predict_fn(m, batch_size, tile, n_cls), "keras", reason, channels=int(m.output_shape[-1]))

    if runtime == "keras":
        return keras("asked for")
    bf16 = runtime == "openvino-bf16"  # OpenVINO's graph (checked in float32) run in bfloat16
    wanted = list(ONNX_RUNTIMES) if runtime == "auto" else ["openvino" if bf16 else runtime]
    usable = [rt for rt in wanted if installed(rt)]
    try:
        record = current_export(model_dir, model_file) if usable else None
    except OSError:  # unreadable files: export again, or fall back below
        record = None
    if usable and record is None:
        keras_model()  # to export; a model that cannot be loaded is its own error, not a fallback
    try:
        if not usable:
            raise ModelError(f"{' and '.join(wanted)} not installed")
        record = record or export_onnx(keras_model(), model_file, model_dir, tile=tile, overwrite=True)
        checks = record.get("checks", {})
        passed = [rt for rt in usable if checks.get(rt, {}).get("equivalent")]
        if not passed:
            raise ModelError("ONNX export differs from Keras (" + "; ".join(
                f"{rt}: max |diff| {checks.get(rt, {}).get('max_abs_diff')}, argmax agreement "
                f"{checks.get(rt, {}).get('argmax_agreement')}" for rt in usable) + ")")
        chosen = passed[0]
        onnx = Path(model_dir) / ONNX_FILE
        fn = openvino_predict_fn(onnx, batch_size, tile, n_cls, precision="bf16") if bf16 else \
            ONNX_RUNTIMES[chosen][1](onnx, batch_size, tile, n_cls)
    except (ModelError, WriteError, OSError) as exc:  # missing, failed, not equivalent, or a read-only folder
        if runtime != "auto":
            raise ParameterError(f"runtime={runtime!r} cannot be used: {exc}; pass runtime='auto' or 'keras'") from None
        return keras(f"fallback: {exc}")
    c = checks[chosen]
    reason = (f"{onnx}, sha256 {record['onnx_sha256'][:12]}, equivalent to Keras: max |diff| "
              f"{c['max_abs_diff']:.2g}, argmax agreement {c['argmax_agreement']:.5f}")
    if bf16:
        ran = getattr(fn, "precision", "?")
        if ran == "bf16":
            b = checks.get("openvino-bf16")
            figures = (f"max |diff| {b['max_abs_diff']:.2g}, argmax agreement {b['argmax_agreement']:.5f} on the check "
                       "tiles" if b else "not measured at export")
            reason = (f"{onnx}, sha256 {record['onnx_sha256'][:12]}, bfloat16 as asked: faster, NOT equivalent to "
                      f"Keras ({figures})")
            log.warning("inference runtime: openvino-bf16 (%s)", reason)
            return Predictor(fn, "openvino-bf16", reason, record["onnx_sha256"], getattr(fn, "channels", None))
        reason = f"bfloat16 asked for, but this CPU runs {ran} (no bfloat16 units); {reason}"
        log.warning("inference runtime: openvino (%s)", reason)
        return Predictor(fn, "openvino", reason, record["onnx_sha256"], getattr(fn, "channels", None))
    log.info("inference runtime: %s (%s)", chosen, reason)
    return Predictor(fn, chosen, reason, record["onnx_sha256"], getattr(fn, "channels", None))
