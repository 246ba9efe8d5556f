"""helpers.pretrained: Keras' EfficientNet weights into the U-Net encoder, proven offline.

A Keras ``EfficientNetB0(weights=None)`` with random weights, saved in the format of
Keras' ``efficientnetb0_notop.h5`` (legacy Keras HDF5 weights), stands in for the ImageNet
file: the transfer, the failure of a download (a local server answering 404) and the
frozen-encoder warm-up are all exercised without internet.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from helpers import model as M
from helpers import pretrained as P

SMALL = (32, 16, 16, 8, 8)  # decoder filters: the encoder is what is tested
#: segmentation_models' skip connections of efficientnetb0, and the encoder output
FEATURES = ("block2a_expand_activation", "block3a_expand_activation", "block4a_expand_activation",
            "block6a_expand_activation", "top_activation")


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    """``(path, model)``: a randomly initialised Keras EfficientNetB0 (no top) saved like Keras' file.

    Batch-norm statistics, scales, offsets and biases are drawn at random too, so that no
    weight of the file equals an initial value of the U-Net's encoder. Its Normalization
    layer holds ImageNet's mean and variance (std squared), so the Keras model maps raw
    0..255 pixels to ``(x / 255 - mean) / std`` inside, as Keras' ImageNet model does.
    """
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format  # writes the layout of Keras' own .h5 files

    keras.utils.set_random_seed(7)
    rng = np.random.default_rng(7)
    kmodel = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(None, None, 3))
    for layer in kmodel.layers:
        if layer.__class__.__name__ == "Normalization":
            layer.weights[0].assign(M.IMAGENET_MEAN)
            layer.weights[1].assign(M.IMAGENET_STD ** 2)
            layer.finalize_state()
            continue
        for w in layer.weights:
            shape = tuple(w.shape)
            if w.name in ("gamma", "moving_variance"):
                w.assign(rng.uniform(0.5, 1.5, shape).astype("float32"))
            elif w.name in ("beta", "moving_mean", "bias"):
                w.assign(rng.normal(0, 0.2, shape).astype("float32"))
    path = tmp_path_factory.mktemp("weights") / "efficientnetb0_notop.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, kmodel)
    return path, kmodel


def _encoder_weights(model) -> dict[str, np.ndarray]:
    return {f"{layer.name}/{w.name}": np.array(w.numpy()) for layer in M.encoder_layers(model) for w in layer.weights}


def test_constants_match_installed_keras():
    from keras.src.applications import efficientnet

    assert P.KERAS_WEIGHTS_BASE_URL == efficientnet.BASE_WEIGHTS_PATH
    for backbone, md5 in P.KERAS_NOTOP_MD5.items():
        assert efficientnet.WEIGHTS_HASHES[backbone[-2:]][1] == md5, backbone
    assert np.allclose(efficientnet.IMAGENET_STDDEV_RGB, M.IMAGENET_STD)
    assert P.imagenet_url() == "https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5"


def test_transfer_reproduces_keras_features(keras_file):
    import keras

    path, kmodel = keras_file
    model = M.build_model(4, None, decoder_filters=SMALL)
    before = _encoder_weights(model)
    src, record = P.resolve_encoder_weights(str(path))
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    record = P.apply_encoder_weights(model, src, record)
    after = _encoder_weights(model)

    # every encoder weight assigned, none left at its initial value, each equal to the file's
    changed = sum(not np.array_equal(before[k], after[k]) for k in before)
    print(f"\nencoder weights assigned {record['weights_assigned']} of {len(before)} "
          f"({record['values_assigned']} values), changed from initialisation {changed}")
    assert record["weights_assigned"] == len(before) == changed > 300
    assert record["values_assigned"] == sum(v.size for v in after.values())
    kweights = {f"{layer.name}/{w.name}": w.numpy() for layer in kmodel.layers for w in layer.weights}
    assert all(np.array_equal(after[k], kweights[k]) for k in after)
    assert record["input_normalisation"]["matches_preprocess"]

    # skip-connection feature maps: U-Net encoder on preprocess(x) == Keras model on raw pixels
    x = np.random.default_rng(3).integers(0, 256, (2, 96, 64, 3)).astype(np.uint8)
    ours = keras.Model(model.input, [model.get_layer(n).output for n in FEATURES]).predict(M.preprocess(x), verbose=0)
    theirs = keras.Model(kmodel.input, [kmodel.get_layer(n).output for n in FEATURES]).predict(
        x.astype("float32"), verbose=0)
    diffs = [float(np.abs(a - b).max()) for a, b in zip(ours, theirs)]
    scale = [float(np.abs(b).max()) for b in theirs]
    print("max abs difference per feature map:", dict(zip(FEATURES, (f"{d:.2e} (of {s:.1f})" for d, s in zip(diffs, scale)))))
    assert max(diffs) < 1e-4
    assert min(scale) > 0.1  # real activations, not all zero
    # the test can fail: feeding the encoder the raw pixels (the wrong preprocessing) is far off
    wrong = keras.Model(model.input, model.get_layer(FEATURES[0]).output).predict(x.astype("float32"), verbose=0)
    assert float(np.abs(wrong - theirs[0]).max()) > 1e-2


def test_file_that_does_not_fit_is_refused(tmp_path):
    missing = tmp_path / "nothing.h5"
    with pytest.raises(P.PretrainedWeightsError, match="file not found") as e:
        M.build_model(4, str(missing), decoder_filters=SMALL)
    assert "\n" not in str(e.value) and "encoder_weights='none'" in str(e.value)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(P.PretrainedWeightsError, match="cannot load as Keras efficientnetb0_notop.h5"):
        M.build_model(4, str(junk), decoder_filters=SMALL)
    with pytest.raises(M.ParameterError, match="encoder_weights_fallback"):
        M.build_model(4, None, decoder_filters=SMALL, encoder_weights_fallback="random")
    # weights of another shape (a one-channel stem): refused as a whole, nothing half-assigned
    import keras

    one_channel = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(None, None, 1))
    unet = M.build_model(4, None, decoder_filters=SMALL)
    before = _encoder_weights(unet)
    with pytest.raises(P.PretrainedWeightsError, match=r"^1 of \d+ encoder weights have no match in the weights "
                       r"file, e.g. stem_conv/kernel \(3, 3, 3, 32\) \(file has \(3, 3, 1, 32\)\)"):
        P.transfer_encoder_weights(one_channel, unet)
    assert all(np.array_equal(v, before[k]) for k, v in _encoder_weights(unet).items())


class _Answer404(BaseHTTPRequestHandler):
    requested: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).requested.append(self.path)
        self.send_error(404, "Not Found")

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture()
def server_404():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer404)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Answer404.requested = []
    yield f"http://127.0.0.1:{server.server_address[1]}/keras-applications/"
    server.shutdown()
    server.server_close()


def test_imagenet_unavailable_stops_with_one_line(server_404, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv(P.URL_ENV, server_404)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))  # nothing cached: the real download runs
    with pytest.raises(P.PretrainedWeightsError) as e:
        M.build_model(4, "imagenet", decoder_filters=SMALL)
    msg = str(e.value)
    print(f"\n{type(e.value).__name__}: {msg}")
    assert _Answer404.requested == ["/keras-applications/efficientnetb0_notop.h5"]  # it did ask the server
    assert "\n" not in msg
    assert msg.startswith(f"encoder_weights='imagenet': cannot download {server_404}efficientnetb0_notop.h5 (HTTP 404")
    assert "encoder_weights=<path to a copy of efficientnetb0_notop.h5>" in msg and "encoder_weights='none'" in msg
    assert not list((tmp_path / "keras").rglob("*.h5"))  # no half file left in the cache

    # only an explicit fallback trains from random weights, and says so
    model = M.build_model(4, "imagenet", decoder_filters=SMALL, encoder_weights_fallback="none")
    assert model.encoder_weights_used is None
    assert model.encoder_weights_start["source"] == "none" and "HTTP 404" in model.encoder_weights_start["fallback_reason"]
    assert "RANDOM" in caplog.text and len(_Answer404.requested) == 2


def test_silent_server_times_out(monkeypatch, tmp_path):
    import socket

    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        monkeypatch.setenv(P.URL_ENV, f"http://127.0.0.1:{silent.getsockname()[1]}/")
        monkeypatch.setenv("KERAS_HOME", str(tmp_path))
        with pytest.raises(P.PretrainedWeightsError, match=r"\(no answer within 0.5 s\); pass encoder_weights="):
            P.fetch_imagenet(timeout=0.5)
    assert socket.getdefaulttimeout() is None  # the process-wide timeout is restored


def test_imagenet_cached_file_is_used_without_network(keras_file, monkeypatch, tmp_path, server_404):
    path, _ = keras_file
    monkeypatch.setenv(P.URL_ENV, server_404)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    cached = tmp_path / "keras" / "models" / "efficientnetb0_notop.h5"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(path.read_bytes())
    # Keras checks the cached file against its md5: the stand-in file's md5 plays Keras' published one
    monkeypatch.setitem(P.KERAS_NOTOP_MD5, "efficientnetb0", hashlib.md5(path.read_bytes()).hexdigest())
    src, record = P.resolve_encoder_weights("imagenet")
    assert src == cached and record["source"] == "imagenet" and _Answer404.requested == []
    # a cached file that fails the md5 check is fetched again (and here the server says 404)
    monkeypatch.setitem(P.KERAS_NOTOP_MD5, "efficientnetb0", "0" * 32)
    with pytest.raises(P.PretrainedWeightsError, match="HTTP 404"):
        P.resolve_encoder_weights("imagenet")


@pytest.mark.slow
def test_warmup_then_fine_tune_from_pretrained_file(keras_file, tmp_path, monkeypatch):
    import pandas as pd
    from test_train import make_synthetic_workdir

    from helpers import train as T

    path, kmodel = keras_file
    snapshots = []  # the encoder's weights at the end of every epoch
    end_epoch = T.Trainer.end_epoch

    def spy(self, *args, **kwargs):
        snapshots.append(_encoder_weights(self.model))
        return end_epoch(self, *args, **kwargs)

    monkeypatch.setattr(T.Trainer, "end_epoch", spy)
    # eager steps: one step per phase does not repay tracing graphs (50 s of CPU -> 9 s); same phases and freezing
    import keras

    compile_ = keras.Model.compile
    monkeypatch.setattr(keras.Model, "compile", lambda self, *a, **kw: compile_(self, *a, **{**kw, "run_eagerly": True}))
    wd = make_synthetic_workdir(tmp_path, n=5, tile=64)
    cfg = T.TrainConfig(epochs=2, warmup_epochs=1, batch_size=2, steps_per_epoch=1, val_fraction=0.3,
                        block_size=128, encoder_weights=str(path), decoder_filters=SMALL, max_val_tiles=2,
                        augment=False, learning_rate=1e-3, seed=1)
    params = T.train_model(wd, cfg, frames=False)
    assert list(pd.read_csv(wd / "model" / "history.csv")["phase"]) == ["warm-up", "fine-tune"]
    assert params["warmup_epochs_run"] == 1 and params["encoder_weights_used"] == str(path.resolve())
    start = params["encoder_weights_start"]
    assert start["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and start["weights_assigned"] > 300
    # the record survives the per-epoch rewrites of training_state.json (07 reads it from there)
    assert json.loads((wd / "model" / "training_state.json").read_text())["encoder_weights_start"] == start
    assert P.read_start_record(wd / "model") == start
    # warm-up: the encoder is frozen at the file's weights; fine-tuning: it learns
    kweights = {f"{layer.name}/{w.name}": w.numpy() for layer in kmodel.layers for w in layer.weights}
    warm, tuned = snapshots
    assert all(np.array_equal(v, kweights[k]) for k, v in warm.items())
    assert sum(not np.array_equal(v, warm[k]) for k, v in tuned.items()) > 100
