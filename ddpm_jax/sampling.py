"""The reverse process of Algorithm 2 as one `lax.scan` over timesteps.

x_T ~ N(0, I); for t = T-1, ..., 0: x_{t-1} = μ_θ(x_t, t) + σ_t z, z = 0 at t = 0.
Compiled once per (batch shape, T): the loop body is traced once, nothing is unrolled,
and no trajectory is stored unless asked for.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion


def step_noise(rng, t, shape, dtype=jnp.float32):
    """The z of Algorithm 2 at step t (0-based): N(0, I) from fold_in(rng, t)."""
    return jax.random.normal(jax.random.fold_in(rng, t), shape, dtype)


def sample_loop(sched, model_fn, x_T, rng, mean_type, var_type, clip_x0=True, t_start=None):
    """Run p_θ from x_T down to x_0 (Algorithm 2). model_fn(x_t, t) -> network output.

    `t_start` (default T-1) starts the chain at an intermediate step with x_T taken as
    x_{t_start}. Returns x_0.
    """
    t_start = sched.num_timesteps - 1 if t_start is None else t_start
    batch = x_T.shape[0]

    def step(x_t, t):
        t_b = jnp.full((batch,), t, dtype=jnp.int32)
        noise = step_noise(rng, t, x_t.shape, x_t.dtype)
        out = model_fn(x_t, t_b)
        x_prev = diffusion.p_sample(sched, out, x_t, t_b, noise, mean_type, var_type, clip_x0)
        return x_prev, None

    ts = jnp.arange(t_start, -1, -1, dtype=jnp.int32)
    x_0, _ = jax.lax.scan(step, x_T, ts)
    return x_0


def to_uint8(x):
    """Images in [-1, 1] -> uint8 pixels k = round((x + 1) · 127.5), clipped to [0, 255]."""
    return np.asarray(jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8))


def image_grid(images, ncols=None):
    """uint8 (N, H, W, C) -> one (rows·H, cols·W, C) image, row-major, blank-padded."""
    n, h, w, c = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = -(-n // ncols)
    grid = np.zeros((nrows * h, ncols * w, c), np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, ncols)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = image
    return grid


def save_png(path, grid):
    from PIL import Image

    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)


def sample(params, rng, *, config, model, sched, num_samples, batch_sharding=None):
    """num_samples images in [-1, 1] from p_θ (Algorithm 2) with the config's mean and
    variance types; x_T and every z are drawn from `rng` alone, so the result does not
    depend on how the batch is laid out over devices."""
    d, data = config.diffusion, config.data
    rng_T, rng_steps = jax.random.split(rng)
    shape = (num_samples, data.image_size, data.image_size, data.num_channels)
    x_T = jax.random.normal(rng_T, shape)
    if batch_sharding is not None:
        x_T = jax.lax.with_sharding_constraint(x_T, batch_sharding)
    model_fn = lambda x, t: model.apply({"params": params}, x, t)
    clip = config.sampling.clip_x0
    return sample_loop(sched, model_fn, x_T, rng_steps, d.mean_type, d.var_type, clip)
