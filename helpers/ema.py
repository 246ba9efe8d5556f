"""An exponential moving average of a Keras model's weights (step 05's ``ema_momentum``).

With a random encoder and batches of four tiles, each epoch's model draws the class borders away
from the strokes differently (validation IoU of a class can swing by 0.5 between epochs). An
average of the weights over the last few epochs is one model that sits between those swings. It
costs no extra training: after every step the average moves towards the current weights.

All of :meth:`keras.Model.get_weights` are averaged, batch-norm moving statistics included, so the
averaged network's statistics match its own weights' history. The average is bias-corrected as
Adam's moments are: after ``n`` updates it is ``sum_k m**(n-k) (1-m) w_k / (1 - m**n)``, an exact
exponential weighting of the steps so far (so the random start does not weigh on it, and a short
run is not averaged over fewer steps than asked).
"""
from __future__ import annotations

import contextlib
import logging
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from helpers.errors import ParameterError

log = logging.getLogger(__name__)


def check_momentum(momentum: float) -> None:
    """Raise :class:`ParameterError` unless 0 < momentum < 1."""
    if not 0 < momentum < 1:
        raise ParameterError(f"ema_momentum={momentum}: must be between 0 and 1 (e.g. 0.98), or 0 for off")


def start_average(model, momentum: float, path: Path, resumed: bool) -> "WeightAverage | None":
    """The run's weight average (None when ``momentum`` is 0); a resumed run continues the one saved at ``path``."""
    if not momentum:
        return None
    ema = WeightAverage(model, momentum)
    if resumed and not ema.load(path):
        log.warning("%s missing, unreadable or not of this model: the weight average restarts from last.keras", path)
    return ema


class WeightAverage:
    """Exponential moving average of ``model.get_weights()``, updated with :meth:`update`.

    Args:
        model: A built Keras model.
        momentum: Weight of the old average per update (0 < momentum < 1); 0.98 averages over
            roughly the last 50 steps.
    """

    def __init__(self, model, momentum: float):
        check_momentum(momentum)
        self.model = model
        self.momentum = float(momentum)
        self.updates = 0
        self.average: list[np.ndarray] | None = None

    def decay(self) -> float:
        """The weight the old average gets at the next update (0 at the first: the weights are copied)."""
        m, n = self.momentum, self.updates
        return m * (1 - m ** n) / (1 - m ** (n + 1))

    def update(self) -> None:
        """Move the average towards the model's current weights (the first call copies them)."""
        weights = self.model.get_weights()
        if self.average is None:
            self.average = [np.array(w, copy=True) for w in weights]
        else:
            d = self.decay()
            for avg, w in zip(self.average, weights):  # all float32 in the U-Net
                avg *= d
                avg += (1.0 - d) * w
        self.updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the model holds the averaged weights; its own weights come back after."""
        if self.average is None:
            yield
            return
        own = self.model.get_weights()
        self.model.set_weights(self.average)
        try:
            yield
        finally:
            self.model.set_weights(own)

    def save(self, path: str | Path) -> None:
        """Write the average and the update count to ``path`` (.npz, atomically, replacing it)."""
        from helpers.io import atomic_path

        if self.average is None:
            return
        with atomic_path(Path(path), overwrite=True) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, *self.average, updates=np.int64(self.updates))

    def load(self, path: str | Path) -> bool:
        """Read an average written by :meth:`save`; False (and nothing changed) when the file is missing,
        unreadable or does not fit the model."""
        path = Path(path)
        if not path.is_file():
            return False
        try:
            with np.load(path) as data:
                arrays = [data[f"arr_{i}"] for i in range(len(data.files) - 1)]
                updates = int(data["updates"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # truncated or not an average: start afresh
            return False
        shapes = [w.shape for w in self.model.get_weights()]
        if [a.shape for a in arrays] != shapes:
            return False
        self.average, self.updates = arrays, updates
        return True
