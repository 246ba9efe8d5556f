"""Test-time augmentation: average a model's probabilities over flips and 90-degree rotations of each tile."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from helpers.errors import ParameterError

#: Transforms per mode: ``(k quarter turns, horizontal flip)``; each is undone on the prediction.
TTA_MODES: dict[str, list[tuple[int, bool]]] = {
    "none": [(0, False)],
    "flips": [(0, False), (0, True), (2, False), (2, True)],  # identity, h-flip, v-flip (rot180+h), rot180
    "d4": [(k, f) for k in range(4) for f in (False, True)],  # the 8 symmetries of the square
}


def _forward(x: np.ndarray, k: int, flip: bool) -> np.ndarray:
    x = np.rot90(x, k, axes=(1, 2))
    return x[:, :, ::-1] if flip else x


def _inverse(y: np.ndarray, k: int, flip: bool) -> np.ndarray:
    y = y[:, :, ::-1] if flip else y
    return np.rot90(y, -k, axes=(1, 2))


def with_tta(predict: Callable[[np.ndarray], np.ndarray], mode: str = "none") -> Callable[[np.ndarray], np.ndarray]:
    """Wrap ``predict(tiles (n, s, s, 3)) -> probabilities (n, s, s, C)`` to average over ``mode``'s transforms.

    ``"none"`` returns ``predict`` itself; ``"flips"`` costs 4 passes, ``"d4"`` 8 (square tiles only).
    """
    if mode not in TTA_MODES:
        raise ParameterError(f"tta={mode!r}: use one of {sorted(TTA_MODES)}")
    if mode == "none":
        return predict
    transforms = TTA_MODES[mode]

    def run(tiles: np.ndarray) -> np.ndarray:
        acc = None
        for k, flip in transforms:
            p = _inverse(predict(np.ascontiguousarray(_forward(tiles, k, flip))), k, flip)
            acc = p.astype(np.float32) if acc is None else acc + p
        return acc / len(transforms)

    return run
