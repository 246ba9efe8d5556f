"""helpers.model: building, the single input transform, loading a trained folder."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import model as M
from helpers.errors import ParameterError


def test_preprocess_numpy_and_tensor_agree():
    import tensorflow as tf

    batch = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    a = M.preprocess(batch)
    b = M.preprocess(tf.constant(batch)).numpy()
    assert a.dtype == np.float32 and b.dtype == np.float32
    assert np.allclose(a, b, atol=1e-6)
    white = M.preprocess(np.full((1, 1, 3), 255, np.uint8))
    assert np.allclose(white, (1 - M.IMAGENET_MEAN) / M.IMAGENET_STD)


def test_build_bad_parameters():
    with pytest.raises(ParameterError):
        M.build_model(0)
    with pytest.raises(ParameterError):
        M.build_model(4, None, input_shape=(100, 100, 3))
    with pytest.raises(ParameterError):
        M.build_model(4, None, decoder_filters=(16, 8))


def test_build_freeze_save_and_load(tmp_path):
    from helpers.io import write_yaml

    model = M.build_model(3, encoder_weights=None, decoder_filters=(16, 16, 8, 8, 8))
    assert model.encoder_weights_used is None and model.encoder_weights_start["source"] == "none"
    x = M.preprocess(np.random.default_rng(1).integers(0, 256, (1, 64, 96, 3)).astype(np.uint8))
    y = model.predict(x, verbose=0)
    assert y.shape == (1, 64, 96, 3)
    assert np.allclose(y.sum(-1), 1, atol=1e-4)  # softmax
    n_enc = M.set_encoder_trainable(model, False)
    assert 100 < n_enc < len(model.layers)
    trainable = {w.path for w in model.trainable_weights}
    assert trainable and all("decoder" in p or "final_conv" in p for p in trainable)
    M.set_encoder_trainable(model, True)
    assert M.set_batchnorm_momentum(model, 0.9) > 40
    with pytest.raises(M.ModelError, match="not found"):
        M.load_trained(tmp_path / "nothing")
    (tmp_path / "m").mkdir()
    with pytest.raises(M.ModelError, match="training_params.yaml"):
        M.load_trained(tmp_path / "m")
    write_yaml({"mpp": 1.0, "tile_size": 64}, tmp_path / "m" / "training_params.yaml")
    with pytest.raises(M.ModelError, match="best.keras"):
        M.load_trained(tmp_path / "m")
    model.save(tmp_path / "m" / "last.keras")
    loaded, params = M.load_trained(tmp_path / "m")
    assert params["mpp"] == 1.0 and params["model_file"].endswith("last.keras")
    assert np.allclose(loaded.predict(x, verbose=0), y, atol=1e-5)
    assert {layer.momentum for layer in loaded.layers if layer.__class__.__name__ == "BatchNormalization"} == {0.9}
    (tmp_path / "m" / "best.keras").write_bytes(b"not a model")
    with pytest.raises(M.ModelError, match="not a complete .keras file"):
        M.load_trained(tmp_path / "m")
