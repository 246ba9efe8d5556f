"""The inference runtime: the trained Keras model exported once to ONNX and run with ONNX Runtime.

Training stays on TensorFlow/Keras. For inference (07 and 08's variants study) the model
is exported once with ``tf2onnx`` *including* :func:`helpers.model.preprocess` (the graph
takes uint8 RGB tiles ``(N, H, W, 3)`` and returns softmax probabilities), written next
to the model as ``model/model.onnx``, and recorded in ``model/model.onnx.json``: its
sha256, the sha256 of the ``.keras`` file it came from, the converter and runtime
versions, and the equivalence figures measured on export (max abs difference of the
probabilities and argmax agreement between Keras and ONNX Runtime on the same tiles).

:func:`make_predictor` picks the runtime: ``"auto"`` uses ONNX Runtime when it is
installed and the export is current and equivalent (exporting it when missing or stale),
else falls back to Keras; one log line says which runtime runs and why. ``"keras"``
forces Keras; ``"onnxruntime"`` requires ONNX Runtime (a one-line error otherwise).
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

import numpy as np

from helpers.errors import ModelError, ParameterError, WriteError

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
ONNX_INFO = "model.onnx.json"
RUNTIMES = ("auto", "onnxruntime", "keras")
#: Export is accepted only when ONNX Runtime agrees with Keras this closely on the check tiles.
MAX_ABS_DIFF = 1e-3
MIN_ARGMAX_AGREEMENT = 0.999
OPSET = 17


@dataclass
class Predictor:
    """uint8 tiles ``(N, H, W, 3)`` -> float32 probabilities ``(N, H, W, C)``, and which runtime does it."""

    predict: Callable[[np.ndarray], np.ndarray]
    runtime: str  # "onnxruntime" or "keras"
    reason: str
    onnx_sha256: str | None = None

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        return self.predict(tiles)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def onnxruntime_available() -> bool:
    """True when ``onnxruntime`` imports."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


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


def keras_predict_fn(model, batch_size: int, tile: int, n_cls: int) -> Callable[[np.ndarray], np.ndarray]:
    """The Keras path: one traced ``tf.function`` on fixed-size (padded) batches."""
    import tensorflow as tf

    from helpers.model import preprocess

    @tf.function(input_signature=[tf.TensorSpec((batch_size, tile, tile, 3), tf.uint8)], reduce_retracing=True)
    def run(x):
        return model(preprocess(x), training=False)

    def predict(tiles: np.ndarray) -> np.ndarray:
        out = np.empty((len(tiles), tile, tile, n_cls), np.float32)
        for i in range(0, len(tiles), batch_size):
            chunk = tiles[i:i + batch_size]
            n = len(chunk)
            if n < batch_size:
                chunk = np.concatenate([chunk, np.full((batch_size - n, tile, tile, 3), 255, np.uint8)])
            out[i:i + n] = run(tf.constant(chunk)).numpy()[:n]
        return out

    return predict


def ort_session(onnx: str | Path | bytes, threads: int = 0):
    """An ONNX Runtime CPU session (all graph optimizations; ``threads`` 0 = the runtime's choice)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3
    src = onnx if isinstance(onnx, bytes) else str(onnx)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def ort_predict_fn(session, batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """The ONNX Runtime path: uint8 tiles in, probabilities out, ``batch_size`` tiles per call."""
    name = session.get_inputs()[0].name

    def predict(tiles: np.ndarray) -> np.ndarray:
        tiles = np.ascontiguousarray(tiles, np.uint8)
        if len(tiles) <= batch_size:
            return session.run(None, {name: tiles})[0]
        return np.concatenate([session.run(None, {name: tiles[i:i + batch_size]})[0]
                               for i in range(0, len(tiles), batch_size)])

    return predict


def compare(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """``max_abs_diff`` and ``argmax_agreement`` of two probability arrays of the same shape."""
    return {"max_abs_diff": float(np.abs(reference - other).max()),
            "argmax_agreement": float((reference.argmax(-1) == other.argmax(-1)).mean())}


def export_onnx(model, model_file: str | Path, out_dir: str | Path, *, tile: int = 256,
                overwrite: bool = False) -> dict:
    """Export a Keras model (with its input transform) to ``out_dir/model.onnx`` and check it.

    Args:
        model: The loaded Keras model.
        model_file: The ``.keras`` file it was loaded from (its sha256 is recorded).
        out_dir: The model folder receiving ``model.onnx`` and ``model.onnx.json``.
        tile: Tile side used for the equivalence check.
        overwrite: Replace an existing export.

    Returns:
        The record written to ``model.onnx.json`` (``equivalent`` says whether it passed).

    Raises:
        ModelError: tf2onnx or onnxruntime missing, or the conversion failed.
    """
    try:
        import onnxruntime
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
    x = check_tiles(tile)
    ref = run(tf.constant(x)).numpy()
    got = ort_session(data).run(None, {"tiles": x})[0]
    figures = compare(ref, got)
    equivalent = figures["max_abs_diff"] <= MAX_ABS_DIFF and figures["argmax_agreement"] >= MIN_ARGMAX_AGREEMENT
    write_bytes(data, onnx_path, overwrite=overwrite)
    record = {
        "onnx_file": ONNX_FILE, "onnx_sha256": hashlib.sha256(data).hexdigest(), "onnx_bytes": len(data),
        "source_file": Path(model_file).name, "source_sha256": sha256_file(model_file),
        "input": "uint8 RGB tiles (N, H, W, 3); helpers.model.preprocess is inside the graph",
        "output": "float32 softmax probabilities (N, H, W, classes)",
        "opset": OPSET, "tf2onnx": tf2onnx.__version__, "onnxruntime": onnxruntime.__version__,
        "tensorflow": tf.__version__, "export_seconds": round(seconds, 1),
        "check": {"tiles": int(len(x)), "tile": int(tile), **figures,
                  "max_abs_diff_allowed": MAX_ABS_DIFF, "argmax_agreement_required": MIN_ARGMAX_AGREEMENT},
        "equivalent": bool(equivalent),
    }
    write_json(record, out_dir / ONNX_INFO, overwrite=overwrite)
    log.info("%s: exported to ONNX in %.0f s (max |diff| %.2g, argmax agreement %.5f)", onnx_path, seconds,
             figures["max_abs_diff"], figures["argmax_agreement"])
    return record


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
    return record


def make_predictor(model, model_dir: str | Path, model_file: str | Path, *, runtime: str = "auto",
                   batch_size: int = 8, tile: int = 256, n_cls: int | None = None) -> Predictor:
    """The fastest equivalent runtime for a trained model, falling back to Keras.

    Args:
        model: The loaded Keras model (used for export and the fallback).
        model_dir: The model folder (``model.onnx`` is kept there).
        model_file: The ``.keras`` file the model came from.
        runtime: ``"auto"``, ``"onnxruntime"`` or ``"keras"``.
        batch_size: Tiles per call.
        tile: Tile side.
        n_cls: Output channels (default: the model's).

    Raises:
        ParameterError: an unknown runtime, or ``"onnxruntime"`` asked for but unusable.
    """
    if runtime not in RUNTIMES:
        raise ParameterError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")
    n_cls = int(n_cls or model.output_shape[-1])

    def keras(reason: str) -> Predictor:
        log.info("inference runtime: keras (%s)", reason)
        return Predictor(keras_predict_fn(model, batch_size, tile, n_cls), "keras", reason)

    if runtime == "keras":
        return keras("asked for")
    try:
        if not onnxruntime_available():
            raise ModelError("onnxruntime is not installed")
        record = current_export(model_dir, model_file)
        if record is None:
            record = export_onnx(model, model_file, model_dir, tile=tile, overwrite=True)
        if not record.get("equivalent"):
            c = record.get("check", {})
            raise ModelError(f"ONNX export differs from Keras (max |diff| {c.get('max_abs_diff')}, argmax agreement "
                             f"{c.get('argmax_agreement')})")
        session = ort_session(Path(model_dir) / ONNX_FILE)
    except (ModelError, WriteError, OSError) as exc:  # missing, failed, not equivalent, or a read-only folder
        if runtime == "onnxruntime":
            raise ParameterError(f"runtime='onnxruntime' cannot be used: {exc}; pass runtime='auto' or 'keras'") from None
        return keras(f"fallback: {exc}")
    c = record["check"]
    reason = (f"{Path(model_dir) / ONNX_FILE}, sha256 {record['onnx_sha256'][:12]}, equivalent to Keras: "
              f"max |diff| {c['max_abs_diff']:.2g}, argmax agreement {c['argmax_agreement']:.5f}")
    log.info("inference runtime: onnxruntime (%s)", reason)
    return Predictor(ort_predict_fn(session, batch_size), "onnxruntime", reason, record["onnx_sha256"])
