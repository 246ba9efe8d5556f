"""Connected-component areas of a label image, computed band by band (never the whole image in memory).

Hole filling and small-object removal (:mod:`helpers.postprocess`) need each region's
*global* area, but a slide's label image need not fit in memory. :func:`band_components`
labels each band of rows on its own (``scipy.ndimage.label``, 4-connectivity, as the
whole-image functions use), joins components across band seams with a union-find, and
returns per band the global area of every pixel's component and whether it touches the
image border. Only the per-component table (a few integers per component) is global.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np


def _find(parent: np.ndarray, a: int) -> int:
    root = a
    while parent[root] != root:
        root = parent[root]
    while parent[a] != root:
        parent[a], a = root, parent[a]
    return root


def band_components(labels, mask_of: Callable[[np.ndarray], np.ndarray], band_rows: int = 512
                    ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(y0, mask, area, touches_border)`` per band: each masked pixel's global component area.

    Args:
        labels: Row-sliceable ``(H, W)`` label image (array, memmap, :class:`helpers.rowstore.RowStore`).
        mask_of: Band of labels -> boolean mask of the pixels to group.
        band_rows: Rows per band.

    ``area`` and ``touches_border`` are per pixel of the band (0 / False outside the mask).
    The labels are read twice (two passes); the bands yielded must not be written into
    ``labels`` before the generator finishes if later bands depend on them (write elsewhere).
    """
    from scipy import ndimage

    h, w = labels.shape[:2]
    offsets, sizes, border = [], [np.zeros(1, np.int64)], [np.zeros(1, bool)]
    pairs: list[np.ndarray] = []
    prev_last, total = None, 0
    for y0 in range(0, h, band_rows):  # pass 1: local components, their sizes, seams
        y1 = min(h, y0 + band_rows)
        comp, n = ndimage.label(mask_of(np.asarray(labels[y0:y1])))
        offsets.append(total)
        gid = np.where(comp > 0, comp + total, 0)
        sizes.append(np.bincount(comp.ravel(), minlength=n + 1)[1:].astype(np.int64))
        b = np.zeros(n + 1, bool)
        b[comp[:, 0]] = True
        b[comp[:, -1]] = True
        if y0 == 0:
            b[comp[0]] = True
        if y1 == h:
            b[comp[-1]] = True
        border.append(b[1:])
        if prev_last is not None:
            both = (prev_last > 0) & (gid[0] > 0)
            if both.any():
                pairs.append(np.unique(np.stack([prev_last[both], gid[0][both]], 1), axis=0))
        prev_last = gid[-1].copy()
        total += n
        del comp, gid
    parent = np.arange(total + 1)
    for p in pairs:
        for a, c in p.tolist():
            ra, rc = _find(parent, a), _find(parent, c)
            if ra != rc:
                parent[max(ra, rc)] = min(ra, rc)
    roots = np.array([_find(parent, i) for i in range(total + 1)], np.int64) if total else parent
    size = np.concatenate(sizes)
    root_size = np.bincount(roots, weights=size, minlength=total + 1).astype(np.int64)
    root_border = np.zeros(total + 1, bool)
    np.logical_or.at(root_border, roots, np.concatenate(border))
    for i, y0 in enumerate(range(0, h, band_rows)):  # pass 2: the same local labels, now with global areas
        y1 = min(h, y0 + band_rows)
        mask = mask_of(np.asarray(labels[y0:y1]))
        comp, _ = ndimage.label(mask)
        r = roots[np.where(comp > 0, comp + offsets[i], 0)]
        r[~mask] = 0
        yield y0, mask, np.where(mask, root_size[r], 0), root_border[r] & mask
