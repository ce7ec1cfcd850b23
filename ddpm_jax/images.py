"""Images at the edges: [-1, 1] floats to pixels, and pixels to one grid image.

Images inside the library are NHWC float32 in [-1, 1], x = k / 127.5 - 1 for pixel k.
"""

import jax
import jax.numpy as jnp
import numpy as np


def quantize(x: jax.Array) -> jax.Array:
    """Images in [-1, 1] -> pixel values k = round((x + 1) · 127.5) in [0, 255], as floats
    (traceable: the FID network applies it inside its jitted function)."""
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255)


def to_uint8(x: jax.Array | np.ndarray) -> np.ndarray:
    """Images in [-1, 1] -> uint8 NumPy pixels (quantize)."""
    return np.asarray(quantize(x).astype(jnp.uint8))


def image_grid(images: np.ndarray, ncols: int | None = None) -> np.ndarray:
    """uint8 (N, H, W, C) -> one (rows·H, cols·W, C) image, row-major, blank-padded."""
    n, h, w, c = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = -(-n // ncols)
    grid = np.zeros((nrows * h, ncols * w, c), np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, ncols)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = image
    return grid
