"""The segmentation network: build it, prepare its input, load a trained one.

The model is ``segmentation_models.Unet`` with an EfficientNet encoder and a softmax
head of ``n_classes`` channels; channel ``i`` is label ``i + 1`` of the class map
(label 0, unlabelled, has no channel). Training (:mod:`helpers.train`) and inference
both feed it through :func:`preprocess`, the single input transform.

Pre-trained encoder weights (ImageNet, from Keras' own EfficientNet files, or a local
copy) are fetched and transferred by :mod:`helpers.pretrained`; :func:`build_model`
records where the encoder started from on the model (``encoder_weights_start``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from helpers.encoder import IMAGENET_MEAN, IMAGENET_STD, encoder_layers  # noqa: F401 - part of this API
from helpers.errors import ModelError, ParameterError

log = logging.getLogger(__name__)

#: Input sides must be multiples of this (five 2x down-samplings in the encoder).
SIZE_MULTIPLE = 32

#: Encoders known to work; any ``segmentation_models`` backbone name is accepted.
BACKBONES = ("efficientnetb0", "efficientnetb1", "efficientnetb2", "efficientnetb3")


def _import_sm():
    """Import segmentation_models with the tf.keras framework (must be set first)."""
    os.environ.setdefault("SM_FRAMEWORK", "tf.keras")
    if os.environ["SM_FRAMEWORK"] != "tf.keras":
        raise ParameterError(f"SM_FRAMEWORK={os.environ['SM_FRAMEWORK']!r}; set it to tf.keras before importing")
    import segmentation_models as sm

    return sm


def build_model(n_classes: int, encoder_weights: str | None = "imagenet", backbone: str = "efficientnetb0",
                decoder_filters: tuple[int, ...] = (256, 128, 64, 32, 16),
                input_shape: tuple[int | None, int | None, int] = (None, None, 3),
                encoder_weights_fallback: str | None = "error"):
    """Build the U-Net (softmax over ``n_classes`` channels; channel i = label i+1).

    Args:
        n_classes: Number of classes of the class map (unlabelled excluded).
        encoder_weights: ``"imagenet"`` (Keras' file, downloaded once into Keras' cache),
            ``None``/``"none"`` (random) or the path of a copy of that file
            (see :mod:`helpers.pretrained`).
        backbone: A ``segmentation_models`` encoder name (ImageNet: efficientnetb0..b7).
        decoder_filters: Filters of the five decoder stages.
        input_shape: ``(H, W, 3)``; ``None`` sides accept any multiple of 32.
        encoder_weights_fallback: ``"error"`` (an unavailable ImageNet file stops with a
            one-line error) or ``"none"`` (WARNING, random encoder).

    Returns:
        An uncompiled ``keras.Model`` with ``encoder_weights_used`` (``"imagenet"``, the
        path, or ``None``) and ``encoder_weights_start`` (the record: file, sha256, counts).
    """
    from helpers import pretrained

    if int(n_classes) < 1:
        raise ParameterError(f"n_classes={n_classes}: need at least one class; check the class map")
    if len(tuple(decoder_filters)) != 5:
        raise ParameterError(f"decoder_filters={decoder_filters}: need five values, one per decoder stage")
    for side in input_shape[:2]:
        if side is not None and side % SIZE_MULTIPLE:
            raise ParameterError(f"input_shape={input_shape}: sides must be multiples of {SIZE_MULTIPLE}")
    sm = _import_sm()
    path, record = pretrained.resolve_encoder_weights(encoder_weights, backbone, encoder_weights_fallback)
    try:
        model = sm.Unet(backbone, encoder_weights=None, classes=int(n_classes), activation="softmax",
                        input_shape=tuple(input_shape), decoder_filters=tuple(int(f) for f in decoder_filters))
    except ValueError as exc:
        if "backbone" in str(exc).lower() or "not" in str(exc).lower():
            raise ParameterError(f"backbone={backbone!r}: {exc}") from None
        raise
    record = pretrained.apply_encoder_weights(model, path, record, backbone)
    model.encoder_weights_start = record
    model.encoder_weights_used = pretrained.weights_used(record)
    return model


def set_encoder_trainable(model, trainable: bool) -> int:
    """Freeze or unfreeze the encoder (warm-up / fine-tuning); returns the number of layers changed.

    Batch-normalisation layers of a frozen encoder run in inference mode (Keras 3
    semantics of ``trainable=False``), so their statistics are kept.
    """
    layers = encoder_layers(model)
    for layer in layers:
        layer.trainable = trainable
    return len(layers)


def set_batchnorm_momentum(model, momentum: float) -> int:
    """Set the moving-statistics momentum of every BatchNormalization layer; returns how many.

    Keras' default 0.99 needs hundreds of steps before the moving averages used at
    inference fit the data; short CPU runs (and randomly initialised layers) need ~0.9.
    """
    n = 0
    for layer in model.layers:
        if layer.__class__.__name__ == "BatchNormalization":
            layer.momentum = float(momentum)
            n += 1
    return n


def preprocess(batch):
    """THE input transform: uint8 RGB ``(..., H, W, 3)`` -> float32 ImageNet-normalised.

    Accepts numpy arrays or TensorFlow tensors and returns the same kind. The same
    function is used for training and inference so they can never disagree.
    """
    if isinstance(batch, np.ndarray) or np.isscalar(batch) or isinstance(batch, (list, tuple)):
        x = np.asarray(batch, dtype=np.float32) / 255.0
        return ((x - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
    import tensorflow as tf

    x = tf.cast(batch, tf.float32) / 255.0
    return (x - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)


def load_params(model_dir: str | Path) -> dict:
    """A trained model folder's ``training_params.yaml``, with ``model_file`` set to the ``.keras`` file to use.

    Neither TensorFlow nor the model is loaded (an inference runtime with a current ONNX
    export does not need them, :mod:`helpers.runtime`).

    Raises:
        ModelError: the folder, the model file or the parameters file is missing or unreadable.
    """
    import yaml

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: model folder not found; run 05_train_model first or pass model_dir=")
    params_path = model_dir / "training_params.yaml"
    if not params_path.is_file():
        raise ModelError(f"{params_path}: not found; the model folder is incomplete, re-run 05_train_model")
    try:
        params = yaml.safe_load(params_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ModelError(f"{params_path}: not valid YAML ({str(exc).splitlines()[0]}); re-run 05_train_model") from None
    for name in ("best.keras", "last.keras"):
        path = model_dir / name
        if path.is_file():
            break
    else:
        raise ModelError(f"{model_dir}: neither best.keras nor last.keras found; run 05_train_model first")
    if name == "last.keras":
        log.warning("%s: best.keras missing, using last.keras", model_dir)
    params["model_file"] = str(path)
    return params


def load_trained(model_dir: str | Path):
    """Load a trained model folder (``workdir/model``) for inference.

    Args:
        model_dir: Folder holding ``best.keras`` (or ``last.keras``) and ``training_params.yaml``.

    Returns:
        ``(model, params)``: the uncompiled ``keras.Model`` and the training parameters dict
        (``mpp``, ``tile_size``, ``classes``, ``normalizer``, ...).

    Raises:
        ModelError: the folder, the model file or the parameters file is missing or unreadable.
    """
    params = load_params(model_dir)
    path = Path(params["model_file"])
    _import_sm()  # registers the custom layers/activations segmentation_models uses
    import zipfile

    import keras

    if not zipfile.is_zipfile(path):  # keras says "File not found" for a truncated file (issue 18)
        raise ModelError(f"{path}: not a complete .keras file (truncated or damaged); copy it again or re-run 05_train_model")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as exc:  # noqa: BLE001 - any decode failure is the same user problem
        raise ModelError(f"{path}: cannot load ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                         "re-run 05_train_model") from None
    return model, params


def keras_input_shape(model_file: str | Path) -> tuple | None:
    """The input shape ``(None, H, W, C)`` recorded in a ``.keras`` file's ``config.json``, without loading it.

    None when the file or its first input layer cannot be read (loading the model then decides).
    """
    import json
    import zipfile

    try:
        with zipfile.ZipFile(model_file) as z:
            config = json.loads(z.read("config.json"))
        for layer in config["config"]["layers"]:
            if layer.get("class_name") == "InputLayer":
                cfg = layer["config"]
                return tuple(cfg.get("batch_shape") or cfg["batch_input_shape"])
    except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile):
        return None
    return None


# --------------------------------------------------------------------------- a trained model's classes


def class_map_from_params(classes: Any, source: str):
    """A :class:`helpers.config.ClassMap` from ``training_params.yaml``'s ``classes`` entry.

    Accepts the :meth:`ClassMap.to_dict` form (``{"classes": [{label, name, color, role}]}``),
    a bare list of such entries, or ``{name: label}``. Roles missing from older folders
    are given as :func:`helpers.config.with_default_roles` does.
    """
    from helpers.config import ROLES, ClassMap, TissueClass, with_default_roles
    from helpers.errors import ClassMapError

    try:
        if isinstance(classes, dict) and "classes" in classes:
            classes = classes["classes"]
        if isinstance(classes, dict):
            items = [TissueClass(int(v), str(k), (128, 128, 128)) for k, v in classes.items()]
        else:
            items = [TissueClass(int(c["label"]), str(c["name"]), tuple(int(v) for v in c.get("color", (128, 128, 128))),
                                 c.get("role") if c.get("role") in ROLES else None)
                     for c in classes]
    except (TypeError, KeyError, ValueError, AttributeError):
        raise ClassMapError(f"{source}: 'classes' is not a class map; re-run 05_train_model") from None
    items = with_default_roles(items, source)
    items.sort(key=lambda c: c.label)
    return ClassMap(tuple(items), 0, source)


def load_model_and_classes(model_dir: str | Path):
    """A trained model for inference: ``(model, training params, class map)``, checked against each other.

    Raises:
        ModelError, ParameterError, ClassMapError: one line naming the model folder's file.
    """
    model, params = load_trained(model_dir)
    cmap = _params_classes(params, model_dir)
    check_outputs(int(model.output_shape[-1]), cmap, params, model_dir)
    return model, params, cmap


def params_and_classes(model_dir: str | Path):
    """:func:`load_model_and_classes` without the model: ``(training params, class map)``; no TensorFlow.

    The model's output channels are checked later, by whoever runs it (:func:`check_outputs`).
    """
    params = load_params(model_dir)
    return params, _params_classes(params, model_dir)


def _params_classes(params: dict, model_dir: str | Path):
    src = str(Path(model_dir) / "training_params.yaml")
    for key in ("mpp", "tile_size", "classes"):
        if params.get(key) in (None, ""):
            raise ParameterError(f"{src}: missing '{key}'; re-run 05_train_model")
    return class_map_from_params(params["classes"], src)


def check_outputs(n_out: int, cmap, params: dict, model_dir: str | Path) -> None:
    """One-line :class:`ClassMapError` when the model's output channels differ from its class map's classes."""
    from helpers.errors import ClassMapError

    if int(n_out) != cmap.n_classes:
        src = str(Path(model_dir) / "training_params.yaml")
        raise ClassMapError(f"{params.get('model_file', model_dir)}: model predicts {n_out} classes but "
                            f"{src} lists {cmap.n_classes} ({', '.join(cmap.names)}); use the matching model folder")


def check_class_map(model_classes, class_map):
    """The class map to use: the user's one if given (must match the model's), else the model's.

    Args:
        model_classes: The model's :class:`helpers.config.ClassMap`.
        class_map: A ClassMap, a ``classes.yaml`` path, or None.
    """
    from helpers.config import ClassMap, load_class_map
    from helpers.errors import ClassMapError

    if class_map is None:
        return model_classes
    cmap = class_map if isinstance(class_map, ClassMap) else load_class_map(class_map)
    if cmap.names != model_classes.names:
        raise ClassMapError(f"{cmap.source}: classes {cmap.names} do not match the model's {model_classes.names} "
                            f"({model_classes.source}); pass the class map the model was trained with")
    return cmap


def _role_channel(cmap, role: str) -> int | None:
    from helpers.errors import ClassMapError

    try:
        cls = cmap.background if role == "background" else cmap.headline
    except ClassMapError:
        return None
    return cmap.classes.index(cls)


def background_index(cmap) -> int:
    """Model channel of the map's background (glass) class; channel 0 when no class has that role."""
    ch = _role_channel(cmap, "background")
    return 0 if ch is None else ch


def headline_index(cmap) -> int | None:
    """Model channel of the map's headline class (e.g. tumour), None when no class has that role."""
    return _role_channel(cmap, "headline")


def init_from_model(model_dir: str | Path, class_map, mpp: float, tile_size: int, out: Path):
    """Round 2 of the annotation loop: start from a previous model folder's ``best.keras``.

    The folder must be another one than ``out`` (copy or rename the previous ``model/``
    first, e.g. to ``model_round1``) and match the classes, resolution and tile size.

    Returns:
        ``(model, encoder_weights_used)``: the weights recorded as ``init:<file>``.
    """
    model_dir = Path(model_dir)
    if model_dir.resolve() == Path(out).resolve():
        raise ParameterError(f"init_model={model_dir}: is this run's own output folder; rename the previous model "
                             "folder (e.g. to model_round1) and pass that")
    model, params, model_cmap = load_model_and_classes(model_dir)
    check_class_map(model_cmap, class_map)
    src = model_dir / "training_params.yaml"
    if abs(float(params["mpp"]) - float(mpp)) > 1e-6 * max(1.0, float(mpp)):
        raise ParameterError(f"{src}: model trained at {params['mpp']} um/px but the tiles are {mpp} um/px; "
                             "export tiles (01) at the model's resolution or train afresh (init_model=None)")
    log.info("fine-tuning from %s (trained at %s um/px, tile %s px; tiles now %s px)", params["model_file"],
             params["mpp"], params["tile_size"], tile_size)
    return model, f"init:{params['model_file']}"
