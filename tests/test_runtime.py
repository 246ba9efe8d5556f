"""The inference runtime (helpers.runtime): ONNX export of the U-Net, its equivalence with Keras, the fallback."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from slide_fixtures import class_map_, setup  # noqa: F401 - fixtures

ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install the project's pins)")
pytest.importorskip("tf2onnx", reason="tf2onnx not installed (pip install the project's pins)")

MAX_DIFF = 1e-3
MIN_AGREE = 0.999


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory, class_map_):
    """The project's U-Net (efficientnetb0, random encoder) saved as a model folder like 05 writes."""
    import keras

    from helpers.io import write_yaml
    from helpers.model import build_model

    d = tmp_path_factory.mktemp("unet") / "model"
    d.mkdir()
    keras.utils.set_random_seed(1)
    model = build_model(class_map_.n_classes, encoder_weights=None)
    model.save(d / "best.keras")
    write_yaml({"mpp": 1.0, "tile_size": 64, "classes": class_map_.to_dict()}, d / "training_params.yaml")
    return d


def _tiles(n: int, side: int, seed: int) -> np.ndarray:
    from helpers.runtime import check_tiles

    rng = np.random.default_rng(seed)
    x = check_tiles(side, n, seed=seed).astype(np.int16)
    return np.clip(x + rng.integers(-40, 41, x.shape), 0, 255).astype(np.uint8)


def _preferred() -> str:
    """The runtime ``auto`` must pick here: the first installed of helpers.runtime's preference order."""
    from helpers.runtime import ONNX_RUNTIMES, installed

    return next(rt for rt in ONNX_RUNTIMES if installed(rt))


def test_auto_prefers_openvino_then_onnxruntime():
    from helpers.runtime import ONNX_RUNTIMES

    assert list(ONNX_RUNTIMES) == ["openvino", "onnxruntime"]  # the measured order (README, "Inference runtime")


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_unet_onnx_export_is_equivalent_to_keras(unet_dir, runtime):
    from helpers.model import load_trained
    from helpers.runtime import ONNX_FILE, ONNX_INFO, installed, keras_predict_fn, make_predictor, sha256_file

    if not installed(runtime):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{runtime} not installed: it is a pinned dependency (pip install -e .)")
        pytest.skip(f"{runtime} not installed (a pinned dependency: pip install -e .)")
    model, params = load_trained(unet_dir)
    auto = make_predictor(model, unet_dir, params["model_file"], runtime="auto", batch_size=4, tile=64)
    assert auto.runtime == _preferred(), auto.reason
    record = json.loads((unet_dir / ONNX_INFO).read_text())
    assert record["onnx_sha256"] == sha256_file(unet_dir / ONNX_FILE) == auto.onnx_sha256
    assert record["source_sha256"] == sha256_file(unet_dir / "best.keras")
    check = record["checks"][runtime]
    assert check["equivalent"] and check["max_abs_diff"] <= MAX_DIFF and check["argmax_agreement"] >= MIN_AGREE
    # fresh inputs the export check never saw, two tile sizes, a batch that is not a multiple of 4
    for side, n in ((64, 6), (128, 3)):
        x = _tiles(n, side, seed=side)
        ref = keras_predict_fn(model, 4, side, 4)(x)
        pred = make_predictor(model, unet_dir, params["model_file"], runtime=runtime, batch_size=4, tile=side)
        assert pred.runtime == runtime
        got = pred(x)
        assert got.shape == ref.shape and got.dtype == np.float32
        assert np.abs(got - ref).max() <= MAX_DIFF
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= MIN_AGREE
        assert np.allclose(got.sum(-1), 1.0, atol=1e-4)


def test_export_is_reused_and_redone_when_the_model_changes(class_map_, tmp_path, caplog):
    from slide_fixtures import make_colour_model

    from helpers.model import load_trained
    from helpers.runtime import ONNX_FILE, ONNX_INFO, current_export, make_predictor

    d = make_colour_model(tmp_path / "model", class_map_)  # a small model: two exports stay cheap
    model, params = load_trained(d)
    assert current_export(d, params["model_file"]) is None
    make_predictor(model, d, params["model_file"], tile=64)
    assert current_export(d, params["model_file"]) is not None
    before = (d / ONNX_INFO).read_text()
    make_predictor(model, d, params["model_file"], tile=64)
    assert (d / ONNX_INFO).read_text() == before  # not exported again
    w, b = model.layers[-1].get_weights()
    model.layers[-1].set_weights([w * 0.5, b])
    model.save(d / "best.keras")  # retrained: the export is stale
    assert current_export(d, d / "best.keras") is None
    model, params = load_trained(d)
    with caplog.at_level(logging.INFO, logger="helpers.runtime"):
        pred = make_predictor(model, d, params["model_file"], tile=64)
    assert pred.runtime == _preferred()
    assert json.loads((d / ONNX_INFO).read_text())["onnx_sha256"] != json.loads(before)["onnx_sha256"]
    assert any(f"inference runtime: {pred.runtime} (" in r.message for r in caplog.records)
    assert (d / ONNX_FILE).is_file()


def test_falls_back_to_keras_when_the_runtime_is_missing(unet_dir, monkeypatch, caplog):
    import helpers.runtime as rt
    from helpers.errors import ParameterError
    from helpers.model import load_trained

    model, params = load_trained(unet_dir)
    monkeypatch.setattr(rt, "installed", lambda runtime: runtime == "keras")
    with caplog.at_level(logging.INFO, logger="helpers.runtime"):
        pred = rt.make_predictor(model, unet_dir, params["model_file"], tile=64)
    assert pred.runtime == "keras" and "openvino and onnxruntime not installed" in pred.reason
    assert any("inference runtime: keras (fallback" in r.message for r in caplog.records)
    with pytest.raises(ParameterError, match="runtime='onnxruntime' cannot be used"):
        rt.make_predictor(model, unet_dir, params["model_file"], runtime="onnxruntime", tile=64)
    with pytest.raises(ParameterError, match="runtime must be one of"):
        rt.make_predictor(model, unet_dir, params["model_file"], runtime="tflite", tile=64)


def test_a_non_equivalent_export_is_refused(class_map_, tmp_path, monkeypatch):
    from slide_fixtures import make_colour_model

    import helpers.runtime as rt
    from helpers.model import load_trained

    d = make_colour_model(tmp_path / "model", class_map_)
    monkeypatch.setattr(rt, "compare", lambda a, b: {"max_abs_diff": 0.3, "argmax_agreement": 0.9})
    model, params = load_trained(d)
    pred = rt.make_predictor(model, d, params["model_file"], tile=64)
    assert pred.runtime == "keras" and "differs from Keras" in pred.reason


def test_predict_slide_labels_are_the_same_through_both_runtimes(setup, unet_dir, tmp_path):
    """The whole 07 step 1 on the U-Net: ONNX Runtime and Keras give the same probabilities and labels."""
    from helpers.predict import predict_slide, read_probabilities

    d, _, _ = setup
    kw = dict(overlap=4, blend="gaussian", batch_size=4, progress=False, normalizer=None)
    a = predict_slide(d / "slide.tiff", unet_dir, tmp_path / "keras", runtime="keras", **kw)
    b = predict_slide(d / "slide.tiff", unet_dir, tmp_path / "ort", runtime="auto", **kw)
    assert a.extra["runtime"] == "keras" and b.extra["runtime"] == _preferred()
    pa, pb = read_probabilities(tmp_path / "keras"), read_probabilities(tmp_path / "ort")
    assert pa.shape == pb.shape
    assert np.abs(pa - pb).max() <= 1.5 / 255  # uint8 storage: at most one step of rounding apart
    assert (pa.argmax(-1) == pb.argmax(-1)).mean() >= MIN_AGREE


def test_a_current_export_runs_without_the_keras_model(setup, unet_dir, tmp_path, monkeypatch):
    """With a current ONNX export, 07 neither loads the .keras model nor TensorFlow's graph of it; same result."""
    import shutil

    import helpers.model as M
    from helpers.errors import ClassMapError
    from helpers.io import read_yaml, write_yaml
    from helpers.predict import predict_slide, read_probabilities

    d, _, _ = setup
    kw = dict(overlap=4, blend="gaussian", batch_size=4, progress=False, normalizer=None)
    a = predict_slide(d / "slide.tiff", unet_dir, tmp_path / "loaded", runtime="onnxruntime", **kw)  # exports if needed
    assert M.keras_input_shape(unet_dir / "best.keras") == (None, None, None, 3)
    assert M.keras_input_shape(d / "slide.tiff") is None  # not a .keras file: loading decides

    def no_keras(*args, **kwargs):
        raise AssertionError("the Keras model was loaded although model.onnx is current")

    monkeypatch.setattr(M, "load_trained", no_keras)
    b = predict_slide(d / "slide.tiff", unet_dir, tmp_path / "lazy", runtime="onnxruntime", **kw)
    assert a.extra["runtime"] == b.extra["runtime"] == "onnxruntime"
    assert b.extra["seconds_by_part"]["setup_model"] < 1.0
    assert np.array_equal(read_probabilities(tmp_path / "loaded"), read_probabilities(tmp_path / "lazy"))
    # the model/class-map check still holds: the ONNX graph's outputs against training_params' classes
    bad = tmp_path / "model_bad"
    shutil.copytree(unet_dir, bad)
    p = read_yaml(bad / "training_params.yaml")
    p["classes"]["classes"] = p["classes"]["classes"][:3]
    write_yaml(p, bad / "training_params.yaml", overwrite=True)
    with pytest.raises(ClassMapError, match="best.keras: model predicts 4 classes"):
        predict_slide(d / "slide.tiff", bad, tmp_path / "bad", runtime="auto", **kw)
    # a stale export needs the Keras model again (to export): it is loaded then
    (bad / "model.onnx.json").write_text("{}")
    with pytest.raises(AssertionError, match="Keras model was loaded"):
        predict_slide(d / "slide.tiff", bad, tmp_path / "stale", runtime="auto", **kw)


def test_bfloat16_runs_only_when_asked_and_says_so(unet_dir, caplog):
    """``openvino-bf16`` is never what ``auto`` picks; asked for, it runs OpenVINO in bfloat16 where the CPU
    has it (its results then differ from float32's) and says which precision ran; the export records its figures."""
    from helpers.model import load_trained
    from helpers.runtime import ONNX_INFO, RUNTIMES, installed, keras_predict_fn, make_predictor

    if not installed("openvino"):
        if os.environ.get("CI") == "true":
            pytest.fail("openvino not installed: it is a pinned dependency (pip install -e .)")
        pytest.skip("openvino not installed (a pinned dependency: pip install -e .)")
    assert "openvino-bf16" in RUNTIMES
    model, params = load_trained(unet_dir)
    auto = make_predictor(model, unet_dir, params["model_file"], runtime="auto", batch_size=4, tile=64)
    assert auto.runtime == "openvino"  # auto never picks the non-equivalent precision
    with caplog.at_level(logging.INFO, logger="helpers.runtime"):
        pred = make_predictor(model, unet_dir, params["model_file"], runtime="openvino-bf16", batch_size=4, tile=64)
    record = json.loads((unet_dir / ONNX_INFO).read_text())
    assert set(record["checks"]["openvino-bf16"]) >= {"max_abs_diff", "argmax_agreement", "equivalent"}
    x = _tiles(6, 64, seed=7)
    ref = keras_predict_fn(model, 4, 64, 4)(x)
    f32 = auto(x)
    got = pred(x)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.allclose(got.sum(-1), 1.0, atol=2e-2)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9
    bf16_cpu = pred.predict.precision == "bf16"  # type: ignore[attr-defined]
    if bf16_cpu:
        assert pred.runtime == "openvino-bf16" and "NOT equivalent" in pred.reason
        assert np.abs(got - f32).max() > 0  # bfloat16 really ran
        assert any(r.levelno == logging.WARNING and "openvino-bf16" in r.message for r in caplog.records)
    else:  # no bfloat16 units: float32 runs, and is reported as such
        assert pred.runtime == "openvino" and "no bfloat16 units" in pred.reason
        assert np.abs(got - f32).max() <= MAX_DIFF
