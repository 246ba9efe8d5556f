"""The moving average of the weights (05's ``ema_momentum``): the arithmetic, the swap, a run and its resume."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from helpers import train as T
from helpers.ema import WeightAverage
from helpers.errors import ParameterError
from test_train import make_synthetic_workdir


def _tiny_model():
    import keras

    inp = keras.Input((4,))
    x = keras.layers.Dense(3)(inp)
    x = keras.layers.BatchNormalization()(x)
    return keras.Model(inp, keras.layers.Dense(2)(x))


def test_average_follows_the_ramped_momentum_and_swaps_back(tmp_path):
    model = _tiny_model()
    ema = WeightAverage(model, 0.9)
    rng = np.random.default_rng(0)
    states = []
    for _ in range(15):
        weights = [rng.normal(size=w.shape).astype(w.dtype) for w in model.get_weights()]
        model.set_weights(weights)
        states.append(weights)
        ema.update()
    assert ema.updates == 15
    # bias-corrected exponential weighting: sum_k m^(n-k) (1-m) w_k / (1 - m^n)
    m, n = 0.9, 15
    coef = np.array([m ** (n - k) * (1 - m) for k in range(1, n + 1)]) / (1 - m ** n)
    expected = [sum(c * s[i] for c, s in zip(coef, states)) for i in range(len(states[0]))]
    for got, want, last in zip(ema.average, expected, states[-1]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert not np.allclose(got, last)  # an average, not the last weights
    # the first update copies; later the old average's weight tends to the momentum
    assert WeightAverage(model, 0.9).decay() == 0.0
    assert 0.9 > ema.decay() > 0.85
    own = model.get_weights()
    with ema.applied():
        for got, want in zip(model.get_weights(), expected):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    for got, want in zip(model.get_weights(), own):
        np.testing.assert_array_equal(got, want)
    # the model's own weights come back after an error inside the block too
    with pytest.raises(RuntimeError):
        with ema.applied():
            raise RuntimeError("boom")
    np.testing.assert_array_equal(model.get_weights()[0], own[0])
    # save / load round trip; a file of another model is refused
    ema.save(tmp_path / "ema.npz")
    again = WeightAverage(model, 0.9)
    assert again.load(tmp_path / "ema.npz") and again.updates == 15
    for a, b in zip(again.average, ema.average):
        np.testing.assert_array_equal(a, b)
    import keras

    other = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)])
    assert not WeightAverage(other, 0.9).load(tmp_path / "ema.npz")
    assert not WeightAverage(model, 0.9).load(tmp_path / "missing.npz")
    data = (tmp_path / "ema.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])  # a truncated copy: refused, not a traceback
    assert not WeightAverage(model, 0.9).load(tmp_path / "cut.npz")


def test_momentum_is_checked():
    with pytest.raises(ParameterError, match="ema_momentum"):
        T.TrainConfig(ema_momentum=1.0).check()
    with pytest.raises(ParameterError, match="ema_momentum"):
        WeightAverage(_tiny_model(), 0.0)
    T.TrainConfig(ema_momentum=0.98).check()


@pytest.mark.slow
def test_training_keeps_the_average_as_best_and_resumes_it(tmp_path):
    import keras

    wd = make_synthetic_workdir(tmp_path, n=5, tile=64)
    cfg = T.TrainConfig(epochs=2, warmup_epochs=0, batch_size=2, steps_per_epoch=3, val_fraction=0.3,
                        block_size=128, encoder_weights=None, decoder_filters=(32, 16, 16, 8, 8), gif_tiles=1,
                        augment=False, learning_rate=1e-3, seed=1, ema_momentum=0.5, checkpoint_metric="mean")
    T.train_model(wd, cfg, frames=False)
    out = wd / "model"
    saved = WeightAverage(keras.models.load_model(out / "last.keras"), 0.5)
    assert saved.load(out / T.EMA_FILE) and saved.updates == 6  # one update per training step
    last = keras.models.load_model(out / "last.keras").get_weights()
    best = keras.models.load_model(out / "best.keras").get_weights()
    hist = pd.read_csv(out / "history.csv")
    # last.keras holds the network's own weights, the average differs from them
    assert any(not np.allclose(a, b) for a, b in zip(saved.average, last))
    if int(hist["val_mean_iou"].idxmax()) == 1:  # best = epoch 2: exactly the average after the last step
        for a, b in zip(best, saved.average):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # the validation figure of the last epoch is the average's: re-scored here from best/average weights
    trainer = T.Trainer(wd, cfg, T.load_class_map(), overwrite=False, resume=True)
    trainer.prepare_data()
    trainer.model = keras.models.load_model(out / "last.keras")
    trainer.model.set_weights(saved.average)
    assert trainer.validate()["mean_iou"] == pytest.approx(hist["val_mean_iou"].iloc[-1], abs=1e-6)
    # resume: the average continues from the file, not from scratch
    cfg.epochs = 3
    T.train_model(wd, cfg, frames=False)
    resumed = WeightAverage(keras.models.load_model(out / "last.keras"), 0.5)
    assert resumed.load(out / T.EMA_FILE) and resumed.updates == 9


def test_curves_say_when_validation_used_the_average():
    from helpers.views.train import plot_history

    h = pd.DataFrame({"epoch": [1, 2], "loss": [1.0, 0.5], "val_iou_Tumor": [0.2, 0.6], "val_mean_iou": [0.3, 0.5]})
    plain, averaged = plot_history(h), plot_history(h, averaged=True)
    assert "weight average" in averaged.axes[1].get_ylabel()
    assert "own weights" in averaged.axes[0].get_legend().get_texts()[0].get_text()
    assert "average" not in plain.axes[1].get_ylabel()
