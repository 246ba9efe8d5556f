"""ImageNet weights for the EfficientNet encoder: fetch, load, transfer, record.

**Source.** The no-top ImageNet weights of ``keras.applications.EfficientNetB0``
(``efficientnetb0_notop.h5``, 16.7 MB, b1..b7 likewise), kept by the Keras project in its
storage bucket (:data:`KERAS_WEIGHTS_BASE_URL`) and checked against the md5 Keras itself
publishes. They are downloaded once by ``keras.utils.get_file`` into Keras' cache
(``$KERAS_HOME`` or ``~/.keras``, sub-folder ``models``). The environment variable
``HISTO_UNET_IMAGENET_URL`` points the download at a mirror (a folder URL holding the
same file names).

**Transfer.** A Keras ``EfficientNetB0(weights=None, include_top=False)`` loads the file;
every weight of every encoder layer of the ``segmentation_models`` U-Net is then copied
from the Keras layer of the same name, weight by weight (same name and shape). Both
implementations name their layers alike (``stem_conv``, ``block1a_dwconv``, ...,
``top_bn``); any encoder weight left unassigned is an error, never a silent partial load.

**Preprocessing.** Keras' model takes raw pixels 0..255 and normalises inside (layers
``Rescaling(1/255)``, ``Normalization`` and, for its ImageNet file, one more
``Rescaling``): ``(x / 255 - mean) / std`` with ImageNet's mean and std. The
``segmentation_models`` encoder has no such layers: it takes
:func:`helpers.model.preprocess`, which computes the same ``(x / 255 - mean) / std``
outside the model. So the transferred encoder is fed exactly what Keras' stem convolution
sees (``tests/test_pretrained.py`` checks the feature maps agree). The file's own
normalisation values are compared with ImageNet's and a WARNING is logged if they differ.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import urllib.error
from pathlib import Path
from typing import Any

import numpy as np

from helpers.errors import ParameterError, PretrainedWeightsError
from helpers.io import sha256_file

log = logging.getLogger(__name__)

#: Folder URL of Keras' applications weights (``keras/src/applications/efficientnet.py``).
KERAS_WEIGHTS_BASE_URL = "https://storage.googleapis.com/keras-applications/"
#: Environment variable that replaces :data:`KERAS_WEIGHTS_BASE_URL` (a mirror, or a test server).
URL_ENV = "HISTO_UNET_IMAGENET_URL"
#: md5 of the no-top files as published by Keras (``WEIGHTS_HASHES`` in the module above).
KERAS_NOTOP_MD5 = {
    "efficientnetb0": "50bc09e76180e00e4465e1a485ddc09d",
    "efficientnetb1": "74c4e6b3e1f6a1eea24c589628592432",
    "efficientnetb2": "111f8e2ac8aa800a7a99e3239f7bfb39",
    "efficientnetb3": "af6d107764bb5b1abb91932881670226",
    "efficientnetb4": "ebc24e6d6c33eaebbd558eafbeedf1ba",
    "efficientnetb5": "38879255a25d3c92d5e44e04ae6cec6f",
    "efficientnetb6": "9ecce42647a20130c1f39a5d4cb75743",
    "efficientnetb7": "cbcfe4450ddf6f3ad90b1b398090fe4a",
}
#: Seconds without an answer after which the download gives up.
DOWNLOAD_TIMEOUT_S = 30.0
#: ``encoder_weights_fallback`` values: stop with an error, or train from random weights.
FALLBACKS = ("error", "none")
#: Record of a random start (``encoder_weights_start`` in ``training_state.json``).
RANDOM = "none (random)"


# --------------------------------------------------------------------------- names and places
def _is_none(value: Any) -> bool:
    return value is None or str(value).strip().lower() in ("none", "null", "")


def keras_file_name(backbone: str) -> str:
    """Keras' no-top weights file of an EfficientNet backbone, e.g. ``efficientnetb0_notop.h5``."""
    if backbone not in KERAS_NOTOP_MD5:
        raise ParameterError(f"backbone={backbone!r}: ImageNet weights are available for {', '.join(KERAS_NOTOP_MD5)}; "
                             "choose one of those or pass encoder_weights='none'")
    return f"{backbone}_notop.h5"


def imagenet_url(backbone: str = "efficientnetb0") -> str:
    """Download URL of the weights file (``$HISTO_UNET_IMAGENET_URL`` replaces Keras' folder)."""
    base = os.environ.get(URL_ENV) or KERAS_WEIGHTS_BASE_URL
    return base.rstrip("/") + "/" + keras_file_name(backbone)


def keras_cache_dir() -> Path:
    """Keras' cache folder (``$KERAS_HOME`` or ``~/.keras``); the file goes to its ``models/``."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")


def _first_line(text: str, limit: int = 200) -> str:
    line = next((s.strip() for s in str(text).splitlines() if s.strip()), "")
    return line[:limit]


def _ways_out(backbone: str, with_url: bool = False) -> str:
    name = keras_file_name(backbone)
    where = f"{KERAS_WEIGHTS_BASE_URL}{name} or " if with_url else ""
    return (f"pass encoder_weights=<path to a copy of {name}> (from {where}~/.keras/models/ of a machine "
            "with internet) or encoder_weights='none' (random start)")


def _download_reason(exc: BaseException, timeout: float) -> str:
    """Why ``keras.utils.get_file`` failed, in a few words (it wraps urllib's errors)."""
    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    for e in seen:
        if isinstance(e, urllib.error.HTTPError):
            return f"HTTP {e.code} {e.reason}"
    for e in seen:
        if isinstance(e, (TimeoutError, socket.timeout)):
            return f"no answer within {timeout:g} s"
        if isinstance(e, urllib.error.URLError):
            return _first_line(e.reason)
    if isinstance(exc, ValueError) and "hash" in str(exc).lower():
        return "the downloaded file fails Keras' md5 check (corrupt or changed)"
    return _first_line(f"{type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- fetch
def fetch_imagenet(backbone: str = "efficientnetb0", timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """The ImageNet no-top weights file: from Keras' cache, or downloaded into it once.

    Args:
        backbone: ``efficientnetb0`` .. ``efficientnetb7``.
        timeout: Seconds without an answer before the download gives up.

    Returns:
        Path of the cached file (md5-checked by Keras).

    Raises:
        PretrainedWeightsError: the file cannot be downloaded (one line: why, and the two ways out).
    """
    import keras

    name = keras_file_name(backbone)
    url = imagenet_url(backbone)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        path = keras.utils.get_file(name, url, cache_subdir="models", file_hash=KERAS_NOTOP_MD5[backbone],
                                    cache_dir=str(keras_cache_dir()))
    except Exception as exc:  # noqa: BLE001 - get_file raises bare Exception for network failures
        raise PretrainedWeightsError(f"encoder_weights='imagenet': cannot download {url} "
                                     f"({_download_reason(exc, timeout)}); {_ways_out(backbone)}") from None
    finally:
        socket.setdefaulttimeout(old)
    return Path(path)


def resolve_encoder_weights(encoder_weights: str | None, backbone: str = "efficientnetb0",
                            fallback: str | None = "error") -> tuple[Path | None, dict]:
    """Decide where the encoder starts from, fetching ImageNet weights if asked.

    Args:
        encoder_weights: ``"imagenet"`` (download once into Keras' cache), ``"none"``/``None``
            (random initialisation) or the path of a Keras EfficientNet no-top weights file.
        backbone: The encoder name.
        fallback: What an unavailable ``"imagenet"`` does: ``"error"`` (default: stop with a
            one-line :class:`PretrainedWeightsError`) or ``"none"`` (WARNING, random start).

    Returns:
        ``(weights file or None, record)``; the record (``source``, ``file``, ``path``,
        ``sha256``, ...) is completed by :func:`apply_encoder_weights`.

    Raises:
        PretrainedWeightsError: ImageNet unavailable without fallback, or a path that is not a file.
        ParameterError: a bad ``fallback`` value, or ImageNet asked for a backbone Keras does not have.
    """
    fallback = "error" if fallback is None else str(fallback).strip().lower()
    if fallback not in FALLBACKS:
        raise ParameterError(f"encoder_weights_fallback={fallback!r}: use 'error' (stop) or 'none' (random weights)")
    requested = "none" if _is_none(encoder_weights) else str(encoder_weights)
    if requested == "none":
        return None, {"source": "none", "requested": requested, "text": RANDOM}
    if requested.lower() == "imagenet":
        try:
            path = fetch_imagenet(backbone)
        except PretrainedWeightsError as exc:
            if fallback != "none":
                raise
            log.warning("%s -- encoder_weights_fallback='none': the encoder starts from RANDOM weights", exc)
            return None, {"source": "none", "requested": requested, "text": RANDOM + ", ImageNet unavailable",
                          "fallback_reason": str(exc)}
        record = {"source": "imagenet", "requested": requested, "url": imagenet_url(backbone),
                  "md5": KERAS_NOTOP_MD5[backbone]}
    else:
        path = Path(requested).expanduser()
        if not path.is_file():
            fix = _ways_out(backbone, True) if backbone in KERAS_NOTOP_MD5 else "pass encoder_weights='none'"
            raise PretrainedWeightsError(f"encoder_weights={requested!r}: file not found; {fix}")
        record = {"source": "file", "requested": requested}
    record.update({"file": path.name, "path": str(path.resolve()), "sha256": sha256_file(path)})
    return path, record


# --------------------------------------------------------------------------- load and transfer
def load_keras_encoder(path: str | Path, backbone: str = "efficientnetb0"):
    """A ``keras.applications`` EfficientNet (no top, random init) holding the weights of ``path``."""
    import keras

    name = keras_file_name(backbone)
    builder = getattr(keras.applications, "EfficientNet" + backbone[len("efficientnet"):].upper())
    model = builder(include_top=False, weights=None, input_shape=(None, None, 3))
    try:
        model.load_weights(str(path))
    except Exception as exc:  # noqa: BLE001 - any decode failure is the same user problem
        raise PretrainedWeightsError(f"{path}: cannot load as Keras {name} ({_first_line(exc)}); "
                                     f"{_ways_out(backbone, True)}") from None
    return model


def input_normalisation(keras_model) -> dict:
    """The file's input normalisation and whether it equals :func:`helpers.model.preprocess`'s.

    Keras' ImageNet files store ImageNet's mean and, as ``variance``, the *std* (Keras then
    divides once more by its square root); a file saved from a ``Normalization`` layer set
    the usual way stores std squared. Both amount to ``(x / 255 - mean) / std``.
    """
    from helpers.encoder import IMAGENET_MEAN, IMAGENET_STD

    layer = next((la for la in keras_model.layers if la.__class__.__name__ == "Normalization"), None)
    if layer is None or len(layer.weights) < 2:
        return {"matches_preprocess": False, "note": "no Normalization layer"}
    mean = np.asarray(layer.weights[0].numpy(), float).ravel()
    var = np.asarray(layer.weights[1].numpy(), float).ravel()
    ok_mean = mean.shape == IMAGENET_MEAN.shape and np.allclose(mean, IMAGENET_MEAN, atol=1e-3)
    conv = ("keras-imagenet" if np.allclose(var, IMAGENET_STD, atol=1e-3) else
            "std-squared" if np.allclose(var, IMAGENET_STD ** 2, atol=1e-4) else None)
    return {"matches_preprocess": bool(ok_mean and conv), "convention": conv,
            "mean": [round(float(v), 4) for v in mean], "variance": [round(float(v), 4) for v in var]}


def transfer_encoder_weights(source, unet) -> dict:
    """Copy every encoder weight of ``unet`` from the Keras layer of the same name in ``source``.

    Args:
        source: A ``keras.applications`` EfficientNet (see :func:`load_keras_encoder`).
        unet: A ``segmentation_models`` U-Net with the same backbone.

    Returns:
        Counts: ``weights_assigned`` (arrays), ``values_assigned`` (numbers), ``layers_assigned``.

    Raises:
        PretrainedWeightsError: an encoder weight without a same-named, same-shaped source
            (nothing is assigned then).
    """
    from helpers.encoder import encoder_layers

    by_name = {layer.name: layer for layer in source.layers}
    plan, problems, n_total = [], [], 0
    for layer in encoder_layers(unet):
        if not layer.weights:
            continue
        n_total += len(layer.weights)
        src = by_name.get(layer.name)
        src_weights = {w.name: w for w in src.weights} if src is not None else {}
        for w in layer.weights:
            s = src_weights.get(w.name)
            if s is None or tuple(s.shape) != tuple(w.shape):
                problems.append(f"{layer.name}/{w.name} {tuple(w.shape)}"
                                + (" (no such layer)" if src is None else
                                   " (missing)" if s is None else f" (file has {tuple(s.shape)})"))
            else:
                plan.append((w, s))
    if problems or len(plan) != n_total:
        raise PretrainedWeightsError(f"{len(problems)} of {n_total} encoder weights have no match in the weights file, "
                                     f"e.g. {', '.join(problems[:3])}; use the Keras file for this backbone "
                                     "or encoder_weights='none'")
    for w, s in plan:
        w.assign(s.numpy())
    return {"weights_assigned": len(plan), "values_assigned": int(sum(int(np.prod(w.shape)) for w, _ in plan)),
            "layers_assigned": len({w.path.rsplit("/", 1)[0] for w, _ in plan})}


def apply_encoder_weights(unet, path: Path | None, record: dict, backbone: str = "efficientnetb0") -> dict:
    """Load the file of :func:`resolve_encoder_weights` into ``unet``'s encoder; return the completed record."""
    record = dict(record)
    if path is None:
        return record
    source = load_keras_encoder(path, backbone)
    record.update(transfer_encoder_weights(source, unet))
    norm = input_normalisation(source)
    record["input_normalisation"] = norm
    if not norm["matches_preprocess"]:
        log.warning("%s: its input normalisation (mean %s, variance %s) is not ImageNet's; the encoder is fed "
                    "helpers.model.preprocess (ImageNet mean/std), so its features may be off", path,
                    norm.get("mean"), norm.get("variance"))
    label = "ImageNet" if record["source"] == "imagenet" else "file"
    record["text"] = f"{label} {record['file']} (sha256 {record['sha256'][:12]}..., {record['weights_assigned']} weights)"
    log.info("encoder weights: %s from %s", record["text"], record["path"])
    return record


def weights_used(record: dict | None) -> str | None:
    """``"imagenet"``, the file path, or ``None`` (random start or no record) from a start record."""
    if not record:
        return None
    return {"imagenet": "imagenet", "file": record.get("path")}.get(record.get("source"))


def describe(record: dict | None) -> str:
    """One line naming the weights a model started from (for summaries)."""
    if not record:
        return "unknown (no record)"
    return str(record.get("text") or record.get("source", "unknown"))


def read_start_record(model_dir: str | Path) -> dict:
    """The ``encoder_weights_start`` record of a trained model folder (07 copies it into its summary)."""
    state = Path(model_dir) / "training_state.json"
    try:
        record = json.loads(state.read_text()).get("encoder_weights_start")
    except (OSError, ValueError):
        record = None
    return record if isinstance(record, dict) else {"source": "unknown", "text": f"unknown ({state.name} has no record)"}
