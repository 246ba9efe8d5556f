"""helpers.gif: frames of equal size, one GIF frame per epoch."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import gif
from helpers.views.gif import plot_frames
from helpers.errors import HistoUNetError, OutputExistsError


def _tiles(n=3, size=48):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size, 3)).astype(np.uint8) for _ in range(n)]
    labels = [rng.integers(0, 5, (size, size)).astype(np.uint8) for _ in range(n)]
    return images, labels


def test_frames_and_gif(tmp_path, class_map):
    images, labels = _tiles()
    labels[1][:] = 2  # all tumour: must be among the chosen tiles
    writer = gif.FrameWriter(tmp_path / "frames", images, labels, class_map, n_tiles=2, seed=0)
    assert 1 in writer.index and len(writer.index) == 2
    for epoch in (1, 2, 3):
        preds = [np.full(lab.shape, 2 if epoch > 1 else 3, np.uint8) for lab in labels]
        writer(epoch, 0.1 * epoch, preds)
    frames = gif.list_frames(tmp_path / "frames")
    assert [p.name for p in frames] == ["epoch_001.png", "epoch_002.png", "epoch_003.png"]
    import imageio.v3 as iio

    f1, f2 = iio.imread(frames[0]), iio.imread(frames[1])
    assert f1.shape == f2.shape and f1.shape[0] > 2 * 192
    # the prediction panel of the tumour tile turns tumour-red between epoch 1 and 2
    assert not np.array_equal(f1, f2)
    out = gif.assemble_gif(tmp_path / "frames", tmp_path / "t.gif", fps=5, hold_last=0)
    assert gif.gif_frame_count(out) == 3
    with pytest.raises(OutputExistsError):
        gif.assemble_gif(tmp_path / "frames", tmp_path / "t.gif")
    gif.assemble_gif(tmp_path / "frames", tmp_path / "t.gif", every=2, hold_last=2, overwrite=True)
    assert gif.gif_frame_count(tmp_path / "t.gif") == 2  # epochs 1 and 3
    from PIL import Image

    with Image.open(tmp_path / "t.gif") as im:
        durations = []
        for i in range(im.n_frames):
            im.seek(i)
            durations.append(im.info["duration"])
    assert durations[-1] == pytest.approx(3 * durations[0], abs=20)  # the last epoch is held
    fig = plot_frames(tmp_path / "frames")
    assert len(fig.axes) == 2


def test_no_frames_is_a_clear_error(tmp_path):
    with pytest.raises(HistoUNetError, match="05_train_model"):
        gif.list_frames(tmp_path)
