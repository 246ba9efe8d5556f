"""In-domain self-supervised pre-training for 05: masked-image modelling of the whole U-Net.

For users who cannot download ImageNet weights. Before supervised training the network
learns the slides' own tissue from the image tiles 05 trains on (no labels are read, and
no pixel outside those tiles is ever seen): random square blocks of each tile, after
:func:`helpers.model.preprocess`, are set to 0 (the ImageNet mean), and a U-Net of the same
backbone and decoder with a 3-channel linear head learns to restore the hidden pixels
(mean squared error over the hidden pixels only). Light augmentation: 90-degree rotations
and flips. Every weight whose layer name and shape match is then copied into the
segmentation model: encoder and decoder, everything but the final convolution.
``region`` (05's ``ssl_region``) limits what the pre-training sees to a box per slide: pixels
outside it are blanked in the input and never a target (the real-data benchmark keeps its
held-out half out this way; 01's tiles reach into it).

:func:`pretrain_into` is the hook :func:`helpers.train.train_model` calls when
``ssl_epochs`` > 0 and the network starts from random weights.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from helpers.errors import ParameterError

log = logging.getLogger(__name__)

#: Layers never transferred: the segmentation head (its output channels are the classes).
HEAD_LAYERS = ("final_conv",)
#: Tiles drawn on the figure / used for the fixed before-after reconstruction loss.
N_SHOWN, N_EVAL = 3, 8


@dataclass
class SSLConfig:
    """Masked-image-modelling parameters (05's ``ssl_*`` parameters map onto these)."""

    epochs: int = 0
    steps_per_epoch: int = 20
    batch_size: int = 4
    learning_rate: float = 1e-3
    block_size: int = 32
    mask_fraction: float = 0.5
    seed: int = 42
    backbone: str = "efficientnetb0"
    decoder_filters: tuple[int, ...] = (256, 128, 64, 32, 16)
    bn_momentum: float = 0.9
    region: str | None = None  # JSON {slide: [x0, y0, x1, y1]} (level-0 px): only these pixels are seen

    def check(self) -> None:
        """Raise :class:`ParameterError` (one line) for a value out of range."""
        for name, value, ok, need in (("epochs", self.epochs, self.epochs >= 0, ">= 0 (0 = off)"),
                                      ("steps_per_epoch", self.steps_per_epoch, self.steps_per_epoch >= 1, ">= 1"),
                                      ("learning_rate", self.learning_rate, self.learning_rate > 0, "> 0"),
                                      ("block_size", self.block_size, self.block_size >= 1, ">= 1 pixel"),
                                      ("mask_fraction", self.mask_fraction, 0 < self.mask_fraction < 1,
                                       "between 0 and 1 (e.g. 0.5)")):
            if not ok:
                raise ParameterError(f"ssl_{name}={value}: must be {need}")


def config_from_train(cfg) -> SSLConfig:
    """The :class:`SSLConfig` of a :class:`helpers.train.TrainConfig` (its ``ssl_*`` fields)."""
    return SSLConfig(epochs=int(cfg.ssl_epochs), steps_per_epoch=int(cfg.ssl_steps_per_epoch),
                     batch_size=int(cfg.batch_size), learning_rate=float(cfg.ssl_learning_rate),
                     block_size=int(cfg.ssl_block_size), mask_fraction=float(cfg.ssl_mask_fraction),
                     seed=int(cfg.seed), backbone=cfg.backbone, decoder_filters=tuple(cfg.decoder_filters),
                     bn_momentum=float(cfg.bn_momentum), region=cfg.ssl_region)


def block_mask(shape: tuple[int, int], block_size: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean ``(H, W)`` mask (True = hidden): ``round(fraction * cells)`` random cells of a ``block_size`` grid,
    the grid shifted by a random offset (wrapping round); exact when the sides are multiples of ``block_size``."""
    h, w = int(shape[0]), int(shape[1])
    gh, gw = -(-h // block_size), -(-w // block_size)
    cells = np.zeros(gh * gw, bool)
    cells[rng.choice(gh * gw, int(round(fraction * gh * gw)), replace=False)] = True
    mask = np.repeat(np.repeat(cells.reshape(gh, gw), block_size, 0), block_size, 1)
    mask = np.roll(mask, (int(rng.integers(block_size)), int(rng.integers(block_size))), axis=(0, 1))
    return mask[:h, :w]


def masked_mse(y_true, y_pred):
    """Mean squared error over the hidden pixels only: ``y_true`` ``(N, H, W, 4)`` is the original
    preprocessed tile and the mask (1 = hidden), ``y_pred`` ``(N, H, W, 3)`` the reconstruction."""
    from keras import ops

    y_true = ops.cast(y_true, "float32")
    target, mask = y_true[..., :3], y_true[..., 3:]
    err = ops.sum(mask * ops.square(ops.cast(y_pred, "float32") - target))
    return err / (3.0 * ops.sum(mask) + 1e-6)


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random 90-degree rotation and flip of an ``(H, W, C)`` tile."""
    image = np.rot90(image, int(rng.integers(4)))
    return np.ascontiguousarray(image[:, ::-1] if rng.random() < 0.5 else image)


def make_batch(images: list[np.ndarray], cfg: SSLConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(masked input, target + mask)`` for uint8 tiles of one size (see :func:`masked_mse`).

    RGBA tiles: alpha 0 marks pixels outside the region, blanked (0) in input and target, never hidden.
    """
    from helpers.model import preprocess

    arr = np.stack(images)
    seen = arr[..., 3] > 0 if arr.shape[-1] == 4 else np.ones(arr.shape[:3], bool)
    x = np.where(seen[..., None], preprocess(arr[..., :3]), 0.0).astype(np.float32)
    mask = np.stack([block_mask(x.shape[1:3], cfg.block_size, cfg.mask_fraction, rng) for _ in images]) & seen
    masked = np.where(mask[..., None], 0.0, x).astype(np.float32)
    return masked, np.concatenate([x, mask[..., None].astype(np.float32)], -1)


def build_reconstruction_net(cfg: SSLConfig):
    """The U-Net of 05 (same backbone and decoder, random start) with a 3-channel linear head."""
    from helpers.model import _import_sm, set_batchnorm_momentum

    sm = _import_sm()
    net = sm.Unet(cfg.backbone, encoder_weights=None, classes=3, activation="linear", input_shape=(None, None, 3),
                  decoder_filters=tuple(int(f) for f in cfg.decoder_filters))
    set_batchnorm_momentum(net, cfg.bn_momentum)
    return net


def _tile(item) -> np.ndarray:
    """A uint8 tile from an array, an image path, or ``(path, (c0, r0, c1, r1))``: RGBA, alpha 255 inside that box."""
    from helpers.dataset import fit_multiple, read_image_tile

    if isinstance(item, np.ndarray):
        return item
    path, box = item if isinstance(item, tuple) else (item, None)
    img = read_image_tile(str(path))
    if box is not None:
        alpha = np.zeros(img.shape[:2], np.uint8)
        alpha[box[1]:box[3], box[0]:box[2]] = 255
        img = np.dstack([img, alpha])
    return fit_multiple(img)


def tile_items(tiles, region: str | None = None) -> list:
    """What :func:`pretrain` reads from a tile table (``image_path``, ``slide``, ``x``, ``y``, ``w``, ``h``, ``downsample``).

    The image paths, or with ``region`` (JSON ``{slide: [x0, y0, x1, y1]}``, level-0 px) ``(path, box in
    tile px)`` for the tiles with pixels inside their slide's box (slides not listed give none).
    """
    if region is None:
        return list(tiles["image_path"])
    from helpers.consistency import box_in_tile, read_region

    boxes = read_region(region, "ssl_region")
    items = []
    for r in (r for r in tiles.to_dict("records") if str(r["slide"]) in boxes):
        ds = float(r.get("downsample", 1.0) or 1.0)
        box = box_in_tile(r, boxes[str(r["slide"])], ds, round(r["w"] / ds), round(r["h"] / ds))
        if box[2] > box[0] and box[3] > box[1]:
            items.append((r["image_path"], box))
    log.info("ssl: %d of %d tiles have pixels inside %s", len(items), len(tiles), region)
    return items


def _same_size(images: list[np.ndarray]) -> list[np.ndarray]:
    h, w = min(im.shape[0] for im in images), min(im.shape[1] for im in images)
    return [im[:h, :w] for im in images]


def reconstruction_loss(net, images: list[np.ndarray], cfg: SSLConfig, seed: int = 0) -> float:
    """:func:`masked_mse` of ``net`` on fixed masks of ``images`` (same seed, same masks)."""
    x, y = make_batch(_same_size([_tile(im) for im in images]), cfg, np.random.default_rng(seed))
    return float(masked_mse(y, net(x, training=False)))


def pretrain(images: list, cfg: SSLConfig, net=None) -> tuple[object, list[dict]]:
    """Masked-image-modelling training of a reconstruction U-Net on (at least one) tiles (see :func:`_tile`).

    Every step draws ``batch_size`` tiles at random (seeded), reads, augments and masks them.
    Returns ``(net, history)``: one ``{"epoch", "loss", "seconds", "cpu_seconds"}`` per epoch.
    """
    import keras

    cfg.check()
    rng = np.random.default_rng(cfg.seed)
    net = net if net is not None else build_reconstruction_net(cfg)
    steps = cfg.epochs * cfg.steps_per_epoch
    rate = keras.optimizers.schedules.CosineDecay(cfg.learning_rate, max(steps, 1), alpha=0.1)
    net.compile(optimizer=keras.optimizers.Adam(rate), loss=masked_mse, jit_compile=False)
    history = []
    for epoch in range(cfg.epochs):
        t0, c0, losses = time.perf_counter(), time.process_time(), []
        for _ in range(cfg.steps_per_epoch):
            pick = rng.integers(len(images), size=cfg.batch_size)
            x, y = make_batch(_same_size([augment(_tile(images[i]), rng) for i in pick]), cfg, rng)
            losses.append(float(np.ravel(net.train_on_batch(x, y))[0]))
        row = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": round(time.perf_counter() - t0, 2),
               "cpu_seconds": round(time.process_time() - c0, 2)}
        history.append(row)
        log.info("ssl epoch %d/%d %.0f s  masked MSE %.4f", epoch + 1, cfg.epochs, row["seconds"], row["loss"])
    return net, history


def transfer_weights(source, target, skip: tuple[str, ...] = HEAD_LAYERS) -> dict:
    """Copy every weight of ``source`` whose layer name and shape match into ``target`` (``skip`` layers excepted).

    Returns ``{"weights": tensors, "layers", "values": numbers copied, "not_transferred": target layers left}``.
    """
    by_name = {layer.name: layer for layer in source.layers}
    n_w = n_l = n_v = 0
    left = []
    for layer in target.layers:
        if not layer.weights:
            continue
        src = by_name.get(layer.name)
        pairs = list(zip(src.weights, layer.weights)) if src is not None and layer.name not in skip else []
        if not pairs or len(src.weights) != len(layer.weights) or any(a.shape != b.shape for a, b in pairs):
            left.append(layer.name)
            continue
        for a, b in pairs:
            b.assign(a.numpy())
            n_v += int(np.prod(a.shape))
        n_w, n_l = n_w + len(pairs), n_l + 1
    return {"weights": n_w, "layers": n_l, "values": n_v, "not_transferred": left}


def plot_ssl(net, images: list[np.ndarray], history: list[dict], cfg: SSLConfig, seed: int = 0):
    """Original / masked / reconstructed (hidden blocks filled in) for a few tiles, and the loss per epoch."""
    from matplotlib.figure import Figure

    from helpers.encoder import IMAGENET_MEAN, IMAGENET_STD

    shown = _same_size([_tile(im) for im in images[:N_SHOWN]])
    x, y = make_batch(shown, cfg, np.random.default_rng(seed))
    pred = np.asarray(net(x, training=False))
    filled = np.where(y[..., 3:] > 0, pred, x)

    def rgb(a: np.ndarray) -> np.ndarray:  # preprocessed -> displayable RGB
        return np.clip(a * IMAGENET_STD + IMAGENET_MEAN, 0, 1)
    fig = Figure(figsize=(12, 3 * len(shown)))
    grid = fig.add_gridspec(len(shown), 4, wspace=0.35, width_ratios=(1, 1, 1, 1.3))
    for r in range(len(shown)):
        for c, (img, title) in enumerate(((y[r, ..., :3], "original"), (x[r], "masked"), (filled[r], "reconstructed"))):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(rgb(img))
            ax.set_axis_off()
            ax.set_title(title if r == 0 else "", fontsize=9)
    ax = fig.add_subplot(grid[:, 3])
    ax.plot([h["epoch"] for h in history], [h["loss"] for h in history], "o-")
    ax.set(xlabel="epoch", ylabel="masked MSE (training)", title=f"{cfg.mask_fraction:.0%} hidden, {cfg.block_size}-px blocks")
    return fig


def pretrain_into(model, tiles, cfg: SSLConfig, out_dir: str | Path | None = None) -> dict:
    """Pre-train on the tiles, copy the weights into the segmentation ``model``, save ``ssl.png``.

    ``model`` is the fresh segmentation U-Net (same backbone and decoder as ``cfg``), ``tiles`` the
    table of the tiles 05 trains on (:func:`tile_items`), ``out_dir`` 05's ``model/`` (None: no figure).
    Returns the ``encoder_weights_start`` record: source "ssl", losses, weights transferred, (CPU) seconds.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    cfg.check()
    images = tile_items(tiles, cfg.region)
    if not images:
        raise ParameterError(f"ssl: no image tiles to pre-train on (ssl_region={cfg.region}); check it or set ssl_epochs=0")
    fixed = [_tile(images[i]) for i in np.random.default_rng(cfg.seed).permutation(len(images))[:N_EVAL]]  # figure, loss
    net = build_reconstruction_net(cfg)
    loss0 = reconstruction_loss(net, fixed, cfg)
    x0, y0 = make_batch(_same_size(fixed), cfg, np.random.default_rng(0))
    zero = float(masked_mse(y0, np.zeros_like(x0)))  # predicting the mean everywhere
    net, history = pretrain(images, cfg, net)
    loss1 = reconstruction_loss(net, fixed, cfg)
    moved = transfer_weights(net, model)
    if out_dir is not None:
        from helpers.viz import save_figure

        save_figure(plot_ssl(net, fixed, history, cfg), Path(out_dir) / "ssl.png")
    record = {"source": "ssl", "epochs": cfg.epochs, "steps_per_epoch": cfg.steps_per_epoch,
              "batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate, "block_size": cfg.block_size,
              "mask_fraction": cfg.mask_fraction, "tiles": len(images), "region": cfg.region,
              "final_loss": round(history[-1]["loss"], 5) if history else None,
              "loss_history": [round(h["loss"], 5) for h in history],
              "fixed_tiles_loss": {"before": round(loss0, 5), "after": round(loss1, 5), "mean_prediction": round(zero, 5)},
              "weights_transferred": moved["weights"], "layers_transferred": moved["layers"],
              "not_transferred": moved["not_transferred"],
              "seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1)}
    record["text"] = (f"in-domain masked-image pre-training (ssl): {cfg.epochs} x {cfg.steps_per_epoch} steps on "
                      f"{len(images)} tiles, masked MSE {loss0:.3f} -> {loss1:.3f}, {moved['weights']} weights transferred")
    log.info("%s; %.0f s (%.0f CPU-s)", record["text"], record["seconds"], record["cpu_seconds"])
    return record
