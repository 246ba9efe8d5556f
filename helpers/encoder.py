"""The EfficientNet encoder's conventions, shared by the network and its pre-trained weights.

:mod:`helpers.model` builds the U-Net around the encoder; :mod:`helpers.pretrained` fills
the encoder with ImageNet weights. Both need which layers are the encoder and what input
it expects; that lives here so neither imports the other's internals.
"""

from __future__ import annotations

import numpy as np

#: ImageNet mean / std: :func:`helpers.model.preprocess` gives the encoder ``(x / 255 - mean) / std``, the input
#: Keras' EfficientNet computes inside its own model (see :mod:`helpers.pretrained`).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def encoder_layers(model) -> list:
    """The encoder layers of a ``segmentation_models`` U-Net (everything before the decoder)."""
    decoder_prefixes = ("decoder_", "center_", "final_conv", "softmax", "sigmoid")
    return [layer for layer in model.layers
            if not layer.name.startswith(decoder_prefixes) and layer.__class__.__name__ != "InputLayer"]
