"""Train the U-Net from sparse labels (step 05): the training loop, checkpoints and state.

Reads the newest tile table (``workdir/labels/manifest.csv`` of step 03) and writes
``workdir/model/`` (see ``docs/workfolder.md``), ending with its done marker. Unlabelled
pixels (label 0) count for nothing: not in the loss (:mod:`helpers.losses`), not in the
metrics (:mod:`helpers.metrics`, the same code 08 uses). The validation IoU on labelled
pixels (the headline class's, or the mean over classes: ``checkpoint_metric``) picks
``best.keras``; with ``ema_momentum`` a moving average of the weights is validated and kept
(:mod:`helpers.ema`). The split
(:mod:`helpers.split`) keeps overlapping or neighbouring tiles off opposite sides; the
input pipeline is :mod:`helpers.dataset`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from helpers.config import ClassMap, load_class_map
from helpers.consistency import BALANCES
from helpers.dataset import fit_multiple, load_augmentation, make_dataset, read_image_tile, read_label_tile, read_tiles
from helpers.ema import check_momentum, start_average
from helpers.errors import HistoUNetError, OutputExistsError, ParameterError
from helpers.losses import class_weights_from_counts, make_loss
from helpers.metrics import confusion_matrix, headline_name, iou_scores
from helpers.split import SPLIT_COLUMN, TRAIN_LABELS_DIR, split_pixels, split_tiles
from helpers.ssl import config_from_train as ssl_config
from helpers.steps import (DONE, fingerprint_of, guard_output, latest_tile_manifest, mark_done, record_fingerprint,
                           reuse_or_guard, step_dir)

log = logging.getLogger(__name__)
EMA_FILE = "ema_weights.npz"  # model/: the weight average of a run with ema_momentum > 0 (for resuming)


@dataclass
class TrainConfig:
    """Training parameters (the notebook's parameters cell maps onto these)."""

    epochs: int = 30
    warmup_epochs: int = 2
    warmup_learning_rate: float = 1e-3
    learning_rate: float = 1e-4
    lr_schedule: str = "cosine"
    batch_size: int = 8
    steps_per_epoch: int | None = None
    crop_size: int | None = None
    val_fraction: float = 0.25
    split_by: str = "auto"
    block_size: float | None = None
    split_margin: float = 0.0
    max_train_tiles: int | None = None
    max_val_tiles: int | None = None
    augment: bool = True
    class_weights: str | None = "auto"
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    focal_gamma: float = 0.0
    crf_weight: float = 0.0  # > 0: local CRF term on all pixels (helpers.losses.local_crf_loss)
    crf_sigma_rgb: float = 0.1
    crf_sigma_xy: float = 3.0
    crf_radius: int = 4
    crf_downscale: int = 2
    consistency_weight: float = 0.0  # > 0: FixMatch term on unlabelled pixels (helpers.consistency)
    consistency_threshold: float = 0.9
    consistency_balance: str = "none"  # "align" (distribution alignment) or "class" (class-balanced targets)
    consistency_region: str | None = None  # JSON {slide: [x0, y0, x1, y1]}: the term only inside (level 0)
    encoder_weights: str | None = "imagenet"
    encoder_weights_fallback: str = "error"
    backbone: str = "efficientnetb0"
    decoder_filters: tuple[int, ...] = (256, 128, 64, 32, 16)
    bn_momentum: float = 0.9
    headline_class: str | None = None  # None: the class map's headline class
    gif_tiles: int = 4
    seed: int = 42
    init_model: str | None = None  # a previous model folder: fine-tune from its best.keras (round 2 of 09)
    checkpoint_metric: str = "headline"  # validation IoU picking best.keras: "headline" or "mean"
    ema_momentum: float = 0.0  # > 0: validate and checkpoint a moving average of the weights (helpers.ema)
    ssl_epochs: int = 0  # > 0: masked-image pre-training of a random network on the training tiles (helpers.ssl)
    ssl_steps_per_epoch: int = 20
    ssl_learning_rate: float = 1e-3
    ssl_block_size: int = 32
    ssl_mask_fraction: float = 0.5
    ssl_region: str | None = None  # JSON {slide: [x0, y0, x1, y1]}: pre-train only on tile pixels inside (level 0)
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.epochs < 1:
            raise ParameterError(f"epochs={self.epochs}: must be >= 1")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ParameterError(f"warmup_epochs={self.warmup_epochs}: must be between 0 and epochs={self.epochs}")
        if self.batch_size < 1:
            raise ParameterError(f"batch_size={self.batch_size}: must be >= 1")
        if self.crop_size is not None and self.crop_size % 32:
            raise ParameterError(f"crop_size={self.crop_size}: must be a multiple of 32 (or None)")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ParameterError(f"lr_schedule={self.lr_schedule!r}: use 'cosine' or 'constant'")
        if self.checkpoint_metric not in ("headline", "mean"):
            raise ParameterError(f"checkpoint_metric={self.checkpoint_metric!r}: use 'headline' or 'mean'")
        if self.ema_momentum:
            check_momentum(self.ema_momentum)
        if self.crf_weight < 0 or self.crf_sigma_rgb <= 0 or self.crf_sigma_xy <= 0:
            raise ParameterError(f"crf_weight={self.crf_weight}, crf_sigma_rgb={self.crf_sigma_rgb}, "
                                 f"crf_sigma_xy={self.crf_sigma_xy}: the weight must be >= 0 (0 = off) and the "
                                 "sigmas > 0 (e.g. 0.1 and 3.0)")
        if self.crf_radius < 1 or self.crf_downscale < 1:
            raise ParameterError(f"crf_radius={self.crf_radius}, crf_downscale={self.crf_downscale}: both must be "
                                 ">= 1 (e.g. 4 and 2)")
        if self.consistency_weight < 0 or not 0 < self.consistency_threshold < 1:
            raise ParameterError(f"consistency_weight={self.consistency_weight}, consistency_threshold="
                                 f"{self.consistency_threshold}: the weight must be >= 0 (0 = off) and the threshold "
                                 "between 0 and 1 (e.g. 1.0 and 0.9)")
        if self.consistency_balance not in BALANCES:
            raise ParameterError(f"consistency_balance={self.consistency_balance!r}: use one of {', '.join(BALANCES)}")
        if self.class_weights not in (None, "auto", "none"):
            raise ParameterError(f"class_weights={self.class_weights!r}: use 'auto' or None")
        ssl_config(self).check()


def set_seeds(seed: int) -> None:
    """Seed Python, numpy and TensorFlow (repeatable up to CPU thread scheduling)."""
    import keras

    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)


def _compile(model, loss, lr: float, encoder_trainable: bool, decay_steps: int = 0):
    """Compile with Adam; ``decay_steps`` > 0 decays the rate to 1 % along a cosine over that many steps."""
    import keras

    from helpers.model import set_encoder_trainable

    set_encoder_trainable(model, encoder_trainable)
    rate = keras.optimizers.schedules.CosineDecay(lr, decay_steps, alpha=0.01) if decay_steps > 0 else lr
    model.compile(optimizer=keras.optimizers.Adam(rate), loss=loss, jit_compile=False)


def _epoch_callback_class():
    import keras

    class EpochEnd(keras.callbacks.Callback):
        """Validation on labelled pixels, checkpoints, history and state after every epoch."""

        def __init__(self, trainer: Trainer):
            super().__init__()
            self.t = trainer
            self.t_epoch = time.perf_counter()
            self.c_epoch = time.process_time()

        def on_epoch_begin(self, epoch, logs=None):
            self.t_epoch = time.perf_counter()
            self.c_epoch = time.process_time()

        def on_train_batch_end(self, batch, logs=None):
            if self.t.ema is not None:
                self.t.ema.update()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            train_s = time.perf_counter() - self.t_epoch
            self.t.epoch_cpu_seconds.append(time.process_time() - self.c_epoch)
            averaged = self.t.ema.applied() if self.t.ema is not None else contextlib.nullcontext()
            with averaged:  # validation, best.keras and the GIF frame see the averaged weights
                metrics = self.t.validate()
                logs.update({f"val_{k}": v for k, v in metrics.items()})
                self.t.end_epoch(epoch, dict(logs), train_s)
            self.t.save_last()  # the network's own weights: a resumed run continues from them

    return EpochEnd


class Trainer:
    """Holds the data, the model and the output folder of one training run (see :func:`train_model`)."""

    def __init__(self, workdir: str | Path, cfg: TrainConfig, class_map: ClassMap, overwrite: bool, resume: bool):
        self.workdir = Path(workdir)
        self.cfg = cfg
        self.cm = class_map
        self.headline = cfg.headline_class or headline_name(class_map)
        self.out = step_dir(self.workdir, "model")
        self.overwrite = overwrite
        self.resume = resume
        self.frame_callback = None
        self.history: list[dict] = []
        self.best_iou = -1.0
        self.best_epoch = -1
        self.epoch_seconds: list[float] = []
        self.epoch_cpu_seconds: list[float] = []
        self.val_seconds: list[float] = []
        self.encoder_weights_start: dict | None = None
        self.ema = None  # helpers.ema.WeightAverage when cfg.ema_momentum > 0

    # ---- data
    def prepare_data(self) -> pd.DataFrame:
        cfg = self.cfg
        df, self.source_step = read_tiles(self.workdir, self.cm)
        df["label_path_orig"] = df["label_path"]  # the pixel split rewrites label_path (consistency: IGNORE there)
        split_file = self.out / "split.csv"
        if cfg.split_by == "pixels":  # every tile trains; held-out pixel blocks validate (deterministic)
            df, held_rows, held_labels = split_pixels(df, read_label_tile, self.out / TRAIN_LABELS_DIR, cfg.val_fraction,
                                                      cfg.block_size, cfg.seed, self.cm.names)
        elif self.resume and split_file.is_file():
            old = pd.read_csv(split_file)
            df = df.merge(old[["tile_id", SPLIT_COLUMN, "group"]], on="tile_id", how="left")
            df[SPLIT_COLUMN] = df[SPLIT_COLUMN].fillna("excluded")
        else:
            df = split_tiles(df, cfg.val_fraction, cfg.split_by, cfg.block_size, cfg.seed, self.cm.names,
                             margin=cfg.split_margin)
        rng = np.random.default_rng(cfg.seed)
        df["used"] = df[SPLIT_COLUMN].isin(["train", "val"]) & (df["px_labelled"] > 0)
        for side, cap in (("train", cfg.max_train_tiles), ("val", cfg.max_val_tiles)):
            idx = df.index[(df[SPLIT_COLUMN] == side) & df["used"]]
            if cap is not None and len(idx) > cap:
                drop = rng.choice(idx, len(idx) - cap, replace=False)
                df.loc[drop, "used"] = False
        self.train_df = df[(df[SPLIT_COLUMN] == "train") & df["used"]].reset_index(drop=True)
        self.val_df = df[(df[SPLIT_COLUMN] == "val") & df["used"]].reset_index(drop=True)
        if cfg.split_by == "pixels":
            self.val_df = held_rows
        if self.train_df.empty or self.val_df.empty:
            raise ParameterError(f"split gave {len(self.train_df)} training and {len(self.val_df)} validation tiles "
                                 "with labels; change val_fraction/block_size or add labelled tiles")
        mpps = df["mpp"].round(4).unique()
        if len(mpps) > 1:
            raise HistoUNetError(f"tiles have different mpp {sorted(mpps)}; export all tiles at one resolution")
        self.mpp = float(mpps[0])
        self.tile_size = int(read_image_tile(self.train_df["image_path"].iloc[0]).shape[0])
        self.split_df = df
        log.info("split by %s: %d train, %d val, %d excluded tiles (%d unlabelled ignored)",
                 cfg.split_by, len(self.train_df), len(self.val_df), int((df[SPLIT_COLUMN] == "excluded").sum()),
                 int((df["px_labelled"] == 0).sum()))
        counts = self.train_df[[f"px_{n}" for n in self.cm.names]].sum().to_numpy()
        self.class_prior = (counts / max(counts.sum(), 1)).tolist()  # labelled class shares (consistency 'align')
        self.class_weights = (class_weights_from_counts(counts).tolist()
                              if cfg.class_weights == "auto" else None)
        # validation tiles are few: keep them decoded in memory
        self.val_images = [fit_multiple(read_image_tile(p)) for p in self.val_df["image_path"]]
        self.val_labels = ([fit_multiple(v) for v in held_labels] if cfg.split_by == "pixels"
                           else [fit_multiple(read_label_tile(p)) for p in self.val_df["label_path"]])
        return df

    def datasets(self):
        self.augmentation = load_augmentation(self.workdir, self.cfg.augment)
        labels, pair = list(self.train_df["label_path"]), None
        if self.cfg.consistency_weight > 0:
            from helpers.consistency import consistency_labels, pair_views

            labels = consistency_labels(self.train_df, self.out / "consistency_labels", self.cfg.consistency_region)
            pair = pair_views
        return make_dataset(list(self.train_df["image_path"]), labels,
                            self.cfg.batch_size, True, self.augmentation, self.cfg.crop_size, self.cfg.seed,
                            image_in_target=self.cfg.crf_weight > 0, pair=pair)

    # ---- evaluation
    def predict_labels(self, images: list[np.ndarray], batch_size: int | None = None) -> list[np.ndarray]:
        """Predicted label images (1..N) for uint8 RGB tiles."""
        from helpers.model import preprocess

        bs = batch_size or max(1, self.cfg.batch_size)
        out = []
        for i in range(0, len(images), bs):
            chunk = images[i:i + bs]
            if len({im.shape for im in chunk}) == 1:
                prob = np.asarray(self.model.predict_on_batch(preprocess(np.stack(chunk))))
                out.extend(np.argmax(prob, -1).astype(np.uint8) + 1)
            else:
                for im in chunk:
                    prob = self.model(preprocess(im[None]), training=False).numpy()
                    out.append(np.argmax(prob[0], -1).astype(np.uint8) + 1)
        return out

    def validate(self) -> dict[str, float]:
        t0 = time.perf_counter()
        preds = self.predict_labels(self.val_images)
        cm = sum(confusion_matrix(t, p, self.cm.n_classes) for t, p in zip(self.val_labels, preds))
        out = iou_scores(cm, self.cm, self.headline)
        self.last_val_preds = preds
        self.val_seconds.append(time.perf_counter() - t0)
        return out

    # ---- state
    def end_epoch(self, epoch: int, logs: dict, train_s: float) -> None:
        from helpers.io import atomic_path, write_json

        self.epoch_seconds.append(train_s)
        row = {"epoch": epoch + 1, "phase": self.phase, "seconds": round(train_s, 2),
               "cpu_seconds": round(self.epoch_cpu_seconds[-1], 2) if self.epoch_cpu_seconds else None,
               "learning_rate": float(np.asarray(self.model.optimizer.learning_rate))}
        row.update({k: (float(v) if np.ndim(v) == 0 else v) for k, v in logs.items()})
        self.history.append(row)
        iou = row.get("val_headline_iou", float("nan"))
        score = row.get(f"val_{self.cfg.checkpoint_metric}_iou", float("nan"))
        improved = np.isfinite(score) and score > self.best_iou
        if improved or not (self.out / "best.keras").is_file():
            if improved:
                self.best_iou, self.best_epoch = float(score), epoch + 1
            with atomic_path(self.out / "best.keras", overwrite=True) as tmp:
                self.model.save(tmp)
        hist = pd.DataFrame(self.history)
        with atomic_path(self.out / "history.csv", overwrite=True) as tmp:
            hist.to_csv(tmp, index=False)
        write_json({"epochs_done": epoch + 1, "best_iou": self.best_iou, "best_epoch": self.best_epoch,
                    "epoch_seconds": self.epoch_seconds, "encoder_weights_start": self.encoder_weights_start,
                    "epoch_cpu_seconds": self.epoch_cpu_seconds, "val_seconds": self.val_seconds},
                   self.out / "training_state.json", overwrite=True)
        if self.frame_callback is not None:
            self.frame_callback(epoch + 1, float(iou), self.last_val_preds)
        log.info("epoch %d/%d (%s) %.0f s  loss %.4f  val %s IoU %.3f  mean IoU %.3f%s", epoch + 1, self.cfg.epochs,
                 self.phase, train_s, row.get("loss", float("nan")), self.headline, iou,
                 row.get("val_mean_iou", float("nan")), "  *best*" if improved else "")

    def save_last(self) -> None:
        """``last.keras`` (the network's own weights and optimizer state) and, with ``ema_momentum``, the average."""
        from helpers.io import atomic_path

        with atomic_path(self.out / "last.keras", overwrite=True) as tmp:
            self.model.save(tmp)
        if self.ema is not None:
            self.ema.save(self.out / EMA_FILE)

    def load_state(self) -> int:
        """Epochs already done (0 for a fresh run); loads history and best IoU when resuming."""
        state_file = self.out / "training_state.json"
        if not (self.resume and state_file.is_file() and (self.out / "last.keras").is_file()):
            return 0
        state = json.loads(state_file.read_text())
        self.best_iou, self.best_epoch = float(state["best_iou"]), int(state["best_epoch"])
        self.epoch_seconds = list(state.get("epoch_seconds", []))
        self.epoch_cpu_seconds = list(state.get("epoch_cpu_seconds", []))
        self.val_seconds = list(state.get("val_seconds", []))
        if (self.out / "history.csv").is_file():
            self.history = pd.read_csv(self.out / "history.csv").to_dict("records")
        return int(state["epochs_done"])


def train_model(workdir: str | Path, cfg: TrainConfig | None = None, class_map: str | Path | None = None,
                overwrite: bool = False, resume: bool = True, frames: bool = True, verbose: int = 2) -> dict:
    """Train (or resume training of) the U-Net on the work folder's labelled tiles.

    Phases: ``warmup_epochs`` with the encoder frozen at ``warmup_learning_rate`` (skipped,
    with a warning, when the encoder has no pre-trained weights), then the whole network
    at ``learning_rate``. After every epoch: validation IoU on labelled pixels,
    ``last.keras``, ``best.keras`` (best validation IoU by ``checkpoint_metric``; the weight
    average with ``ema_momentum``), ``history.csv``, a GIF frame.
    The folder's done marker (:func:`helpers.steps.mark_done`) is written at the end.
    ``ssl_epochs`` > 0 with a random start: :mod:`helpers.ssl` pre-trains the network on the
    training tiles first (no warm-up then: its batch-norm statistics come from masked tiles).

    Args:
        workdir: The work folder (reads ``labels/``, writes ``model/``).
        cfg: Training parameters.
        class_map: Class map YAML (default: the project's ``data/classes.yaml``).
        overwrite: Start afresh, replacing an earlier (finished or not) run.
        resume: Continue an interrupted run from ``last.keras`` (epoch counter and optimizer state).
        frames: Save ``frames/epoch_NNN.png`` for the training GIF.
        verbose: Keras fit verbosity (2 = one line per epoch, good for papermill logs).

    Returns:
        The training parameters dict also written to ``model/training_params.yaml``.
    """
    import keras

    from helpers.io import write_yaml
    from helpers.model import build_model, init_from_model, set_batchnorm_momentum

    cfg = cfg or TrainConfig()
    cfg.check()
    cmap = load_class_map(class_map) if class_map else load_class_map()
    out = step_dir(workdir, "model")
    if cfg.init_model and Path(cfg.init_model).resolve() == out.resolve():  # checked before anything is removed
        raise ParameterError(f"init_model={cfg.init_model}: is this run's own output folder; rename the previous "
                             "model folder (e.g. to model_round1) and pass that")
    params_file = out / "training_params.yaml"
    state_file = out / "training_state.json"
    t_start, c_start = time.perf_counter(), time.process_time()
    earlier = [p for p in (out.iterdir() if out.is_dir() else []) if p.name != "split.png"]
    inputs = [latest_tile_manifest(workdir)[0]] + ([step_dir(workdir, "augment") / "augment.yaml"] if cfg.augment else [])
    fingerprint = fingerprint_of(dict(config=asdict(cfg), classes=cmap.names), inputs)  # re-run: reuse if the same
    finished = state_file.is_file() and json.loads(state_file.read_text()).get("epochs_done", 0) >= cfg.epochs
    if finished and params_file.is_file() and reuse_or_guard(out, fingerprint, overwrite, "an earlier training run"):
        import yaml

        return yaml.safe_load(params_file.read_text())
    if earlier:
        if overwrite:
            import shutil

            for p in out.iterdir():  # the notebook's split.png of this run stays
                if p.name != "split.png":
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        elif resume and state_file.is_file():
            state = json.loads(state_file.read_text())
            if params_file.is_file() and state["epochs_done"] >= cfg.epochs:
                raise OutputExistsError(f"{params_file}: training already finished ({state['epochs_done']} epochs); "
                                        "pass overwrite=True to train again or raise epochs= to continue")
        else:
            guard_output(out, overwrite, what="an earlier training run")
    out.mkdir(parents=True, exist_ok=True)
    (out / DONE).unlink(missing_ok=True)  # a resumed run is unfinished until it ends
    record_fingerprint(out, fingerprint)  # read back by a re-run (reuse_or_guard) once the done marker is written
    set_seeds(cfg.seed)
    trainer = Trainer(workdir, cfg, cmap, overwrite, resume)
    split_df = trainer.prepare_data()
    done = trainer.load_state()
    split_df.drop(columns=["image_path", "label_path", "label_path_orig"]).to_csv(out / "split.csv", index=False)
    cmap.save(out / "classes.yaml")
    loss = make_loss(cmap.n_classes, cfg.ce_weight, cfg.dice_weight, cfg.focal_gamma, trainer.class_weights,
                     cfg.crf_weight, cfg.crf_sigma_rgb, cfg.crf_sigma_xy, cfg.crf_radius, cfg.crf_downscale,
                     cfg.consistency_weight, cfg.consistency_threshold, cfg.consistency_balance,
                     trainer.class_prior if cfg.consistency_balance == "align" else None)

    if done:
        log.info("resuming from %s after epoch %d", out / "last.keras", done)
        trainer.model = keras.models.load_model(out / "last.keras", compile=True)
        from helpers.pretrained import weights_used

        trainer.encoder_weights_start = json.loads(state_file.read_text()).get("encoder_weights_start")
        encoder_used = weights_used(trainer.encoder_weights_start)
    elif cfg.init_model:
        trainer.model, encoder_used = init_from_model(cfg.init_model, cmap, trainer.mpp, trainer.tile_size, out)
        trainer.encoder_weights_start = {"source": "model", "path": encoder_used.removeprefix("init:"),
                                         "text": f"fine-tuned from {encoder_used.removeprefix('init:')} (init_model)"}
    else:
        trainer.model = build_model(cmap.n_classes, cfg.encoder_weights, cfg.backbone, tuple(cfg.decoder_filters),
                                    encoder_weights_fallback=cfg.encoder_weights_fallback)
        encoder_used = trainer.model.encoder_weights_used
        trainer.encoder_weights_start = trainer.model.encoder_weights_start
        set_batchnorm_momentum(trainer.model, cfg.bn_momentum)
        if cfg.ssl_epochs and encoder_used is None:  # random start: pre-train on the training tiles first
            from helpers.ssl import pretrain_into

            trainer.encoder_weights_start = pretrain_into(trainer.model, trainer.train_df, ssl_config(cfg), out)
    trainer.ema = start_average(trainer.model, cfg.ema_momentum, out / EMA_FILE, resumed=bool(done))
    warmup = cfg.warmup_epochs if not cfg.init_model else 0  # a fine-tuned decoder needs no warm-up
    if warmup and encoder_used is None:
        log.warning("warm-up with a frozen encoder skipped: the encoder has no ImageNet or file weights")
        warmup = 0
    from helpers.io import write_json

    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    state.update({"encoder_weights_used": encoder_used, "encoder_weights_start": trainer.encoder_weights_start,
                  "epochs_done": done, "best_iou": trainer.best_iou,
                  "best_epoch": trainer.best_epoch})
    write_json(state, state_file, overwrite=True)

    if frames:
        from helpers.gif import FrameWriter

        writer = FrameWriter(out / "frames", trainer.val_images, trainer.val_labels, cmap,
                             n_tiles=cfg.gif_tiles, headline=trainer.headline, seed=cfg.seed,
                             boxes=trainer.val_df[["slide", "x", "y", "w", "h"]].to_numpy().tolist())
        trainer.frame_callback = writer
    train_ds = trainer.datasets()
    steps = cfg.steps_per_epoch or max(1, math.ceil(len(trainer.train_df) / cfg.batch_size))
    callback = _epoch_callback_class()(trainer)
    t_fit, c_fit = time.perf_counter(), time.process_time()
    phases = [("warm-up", 0, warmup, cfg.warmup_learning_rate, False),
              ("fine-tune", warmup, cfg.epochs, cfg.learning_rate, True)]
    for name, first, last, lr, enc_trainable in phases:
        start = max(first, done)
        if start >= last:
            continue
        trainer.phase = name
        resumed_same_phase = done > first and trainer.model.optimizer is not None and trainer.model.compiled
        if resumed_same_phase:
            from helpers.model import set_encoder_trainable

            set_encoder_trainable(trainer.model, enc_trainable)
        else:
            cosine = cfg.lr_schedule == "cosine" and enc_trainable
            _compile(trainer.model, loss, lr, enc_trainable, steps * (last - first) if cosine else 0)
        log.info("%s: epochs %d-%d, lr %.1e, encoder %s", name, start + 1, last, lr,
                 "trainable" if enc_trainable else "frozen")
        trainer.model.fit(train_ds, epochs=last, initial_epoch=start, steps_per_epoch=steps,
                          callbacks=[callback], verbose=verbose, shuffle=False)
        done = last
    fit_s, fit_cpu_s = time.perf_counter() - t_fit, time.process_time() - c_fit

    hist = pd.DataFrame(trainer.history)
    n_epochs_run = len(trainer.epoch_seconds)
    img_per_s = (steps * cfg.batch_size * n_epochs_run / max(sum(trainer.epoch_seconds), 1e-9)
                 if n_epochs_run else float("nan"))
    normalizer = step_dir(workdir, "stain") / "normalizer.json"
    last_row = hist.iloc[-1].to_dict() if len(hist) else {}
    cfg_dict = asdict(cfg)
    cfg_dict.pop("extra")
    cfg_dict["decoder_filters"] = list(cfg.decoder_filters)
    params = {
        "mpp": trainer.mpp,
        "tile_size": trainer.tile_size,
        "input_multiple": 32,
        "backbone": cfg.backbone,
        "n_classes": cmap.n_classes,
        "classes": cmap.to_dict(),
        "normalizer": (str(normalizer.relative_to(workdir)) if normalizer.is_file() and trainer.source_step != "tiles"
                       else None),
        "preprocess": "helpers.model.preprocess (x/255, ImageNet mean/std)",
        "encoder_weights": cfg.encoder_weights,
        "encoder_weights_used": encoder_used,
        "encoder_weights_start": trainer.encoder_weights_start,
        "epochs": cfg.epochs,
        "warmup_epochs_run": warmup,
        "seed": cfg.seed,
        "split": {"by": cfg.split_by if cfg.split_by != "auto" else
                  ("slide" if split_df["slide"].nunique() >= 3 else "region"),
                  "block_size": cfg.block_size, "margin": cfg.split_margin, "val_fraction": cfg.val_fraction, "file": "split.csv",
                  "n_train": len(trainer.train_df), "n_val": len(trainer.val_df),
                  "n_excluded": int((split_df[SPLIT_COLUMN] == "excluded").sum())},
        "source": trainer.source_step,
        "class_weights": trainer.class_weights,
        "augmentation": (str(step_dir(workdir, "augment").relative_to(workdir) / "augment.yaml")
                         if getattr(trainer, "augmentation", None) is not None else None),
        "best_tumor_iou": trainer.best_iou,
        "best_epoch": trainer.best_epoch,
        "headline_class": trainer.headline,
        "last_val": {k: v for k, v in last_row.items() if str(k).startswith("val_")},
        "timings": {"total_s": round(time.perf_counter() - t_start, 1), "fit_s": round(fit_s, 1),
                    "total_cpu_s": round(time.process_time() - c_start, 1), "fit_cpu_s": round(fit_cpu_s, 1),
                    "ssl_cpu_s": (trainer.encoder_weights_start or {}).get("cpu_seconds"),
                    "load_average_1min": round(os.getloadavg()[0], 1),
                    "epoch_s": [round(s, 1) for s in trainer.epoch_seconds],
                    "val_s_per_epoch": round(float(np.mean(trainer.val_seconds)), 2) if trainer.val_seconds else None,
                    "train_images_per_s": round(img_per_s, 2)},
        "steps_per_epoch": steps,
        "config": cfg_dict,
    }
    write_yaml(params, params_file, overwrite=True)
    mark_done(out)
    return params

