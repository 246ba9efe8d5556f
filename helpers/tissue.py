"""What is tissue and what is glass: the one rule every step uses.

Steps 01 (tile export), 02 (stain estimation), 03 (label refinement) and 07 (which
tiles to predict) all ask the same question of an RGB image; they get their answer here.
"""

from __future__ import annotations

import numpy as np


def slide_tissue_mask(slide, max_size: int = 2048) -> tuple[np.ndarray, float]:
    """Low-resolution tissue mask of a slide: not glass (bright, unsaturated) and not black.

    Args:
        slide: A :class:`helpers.slides.Slide`.
        max_size: Longest side of the thumbnail the mask is computed on.

    Returns:
        ``(mask, downsample)`` with the mask's level-0 pixels per mask pixel.
    """
    import cv2

    thumb, ds = slide.thumbnail(max_size)
    hsv = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)
    sat, val = hsv[..., 1], hsv[..., 2]
    gray = cv2.cvtColor(thumb, cv2.COLOR_RGB2GRAY)
    mask = ((sat > 20) | (gray < 200)) & (val > 30)
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)).astype(bool)
    return mask, ds
