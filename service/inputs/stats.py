"""A few statistics of the images the model saw, for drift monitoring (service/observe/drift.py): the export
records their distribution on the MNIST test set (export/drift.py), the service their distribution in its recent
traffic. Pure numpy, vectorized over a batch.

- ``ink``: the mean intensity of the 28x28 image (0..1), how much of it is stroke;
- ``stroke_width``: twice the area of the stroke mask (intensity > 0.5) over its perimeter (the pixel sides
  between mask and background, the image border included), in pixels. For a stroke of width w and length
  L >> w that is 2wL / (2L + 2w), about w; a diagonal stroke's staircase edges lengthen its perimeter, so it
  reads up to ~30% thinner. A cheap estimate, compared only with itself on the reference;
- ``centre_x``, ``centre_y``: the intensity-weighted centre of mass, in pixels from the top-left pixel's centre
  (an image with no ink: the image's centre).
"""

from __future__ import annotations

import functools

import numpy as np

NAMES = ("ink", "stroke_width", "centre_x", "centre_y")  # the columns of ``input_stats``
STROKE_LEVEL = 0.5  # a pixel above this intensity is stroke


def input_stats(images: np.ndarray) -> np.ndarray:
    """[N, H, W] intensities in 0..1 (white digit on black) -> [N, 4] float32, the columns of ``NAMES``."""
    images = np.asarray(images, dtype=np.float32)
    n, h, w = images.shape
    # one product and one reduction over each image's contiguous pixels: few numpy calls (a batch is often one
    # image), and no matrix product, whose BLAS kernel (and rounding) depends on the batch's size
    mass, mx, my = (images.reshape(n, 1, h * w) * _weights(h, w)).sum(axis=2, dtype=np.float64).T
    inked = mass > 0
    safe = np.where(inked, mass, 1.0)
    out = np.empty((n, len(NAMES)), np.float32)
    out[:, 0] = mass / (h * w)
    out[:, 1] = stroke_width(images > STROKE_LEVEL)
    out[:, 2] = np.where(inked, mx / safe, (w - 1) / 2)
    out[:, 3] = np.where(inked, my / safe, (h - 1) / 2)
    return out


def stroke_width(mask: np.ndarray) -> np.ndarray:
    """[N, H, W] bool -> [N] float32: 2 x area / perimeter of each mask (0 for an empty one). Each stroke pixel
    has 4 sides, and each pair of stroke pixels side by side hides 2 of them: perimeter = 4 area - 2 pairs."""
    n = len(mask)
    area = mask.reshape(n, -1).sum(axis=1)
    pairs = (mask[:, 1:, :] & mask[:, :-1, :]).reshape(n, -1).sum(axis=1)
    pairs += (mask[:, :, 1:] & mask[:, :, :-1]).reshape(n, -1).sum(axis=1)
    return (2.0 * area / np.maximum(4 * area - 2 * pairs, 1)).astype(np.float32)


@functools.cache
def _weights(h: int, w: int) -> np.ndarray:
    """[3, H x W]: each pixel's weight in the mass, in x and in y."""
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([np.ones(h * w), xs.ravel(), ys.ravel()]).astype(np.float32)
