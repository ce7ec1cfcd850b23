"""The reverse process of Algorithm 2 as one `lax.scan` over timesteps.

x_T ~ N(0, I); for t = T-1, ..., 0: x_{t-1} = μ_θ(x_t, t) + σ_t z, z = 0 at t = 0.
Compiled once per (batch shape, T): the loop body is traced once, nothing is unrolled,
and no trajectory is stored unless asked for.
"""

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from ddpm_jax import config_lib, diffusion, guidance, schedules, sharding, unet
from ddpm_jax.checkpointing import restore_params  # noqa: F401 (the Colab needs both)
from ddpm_jax.errors import UserError


def example_keys(rng, num_samples, offset=0):
    """One key per sample, fold_in(rng, i): sample i's noise depends on (rng, i) alone, not
    on the batch size, the chunking or the number of devices."""
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(offset + jnp.arange(num_samples))


keyed_normal = diffusion.keyed_normal  # per-sample N(0, I) from fold_in(key_i, t)


def initial_noise(keys, shape, num_timesteps):
    """x_T ~ N(0, I) per sample (index T is never a step's z, which uses 0..T-1)."""
    return keyed_normal(keys, num_timesteps, shape)


def reverse_step_fn(sched, spec, model_fn, noise, eta=None):
    """step(x_t, t) -> (x_{t-1}, x̂_0) for a traced scalar t: diffusion.reverse_step on the
    network output, with the z of step t from diffusion.step_noise(noise, t, x_t)."""

    def step(x_t, t):
        t_b = jnp.full((x_t.shape[0],), t, dtype=jnp.int32)
        z = diffusion.step_noise(noise, t, x_t)
        return diffusion.reverse_step(sched, spec, model_fn(x_t, t_b), x_t, t_b, z, eta)

    return step


def reverse_steps(step, x, t_top, length):
    """`length` reverse steps t_top, t_top - 1, ... of step(x_t, t) -> (x_{t-1}, x̂_0), as one
    `lax.scan`; t_top may be traced, so every segment of a chain shares one program."""
    ts = t_top - jnp.arange(length, dtype=jnp.int32)
    return jax.lax.scan(lambda x, t: (step(x, t)[0], None), x, ts)[0]


def sample_loop(sched, spec, model_fn, x_T, noise, t_start=None, eta=None, every=None):
    """Run p_θ from x_T down to x_0 (Algorithm 2). model_fn(x_t, t) -> network output; the
    z of step t is diffusion.step_noise(noise, t, x): noise is one key per sample
    (example_keys), a function of t, or an array with one draw per step on axis 0.

    t_start (default T-1) starts the chain at an intermediate step with x_T taken as
    x_{t_start}. eta switches to DDIM steps (0: deterministic). With `every` = k, also
    returns the progression (Fig. 6): x_t and x̂_0 after every k steps, stacked on axis 0.
    """
    t_start = sched.num_timesteps - 1 if t_start is None else t_start
    step = reverse_step_fn(sched, spec, model_fn, noise, eta)
    if every is None:
        return reverse_steps(step, x_T, t_start, t_start + 1)
    ts = jnp.arange(t_start, -1, -1, dtype=jnp.int32)
    if ts.shape[0] % every:
        raise ValueError(f"every={every} must divide the number of steps {ts.shape[0]}")

    def chunk(x, ts_chunk):  # k steps, then keep one snapshot
        (x, x0_pred), _ = jax.lax.scan(lambda c, t: (step(c[0], t), None), (x, x), ts_chunk)
        return x, (x, x0_pred)

    x_0, (xs, x0_preds) = jax.lax.scan(chunk, x_T, ts.reshape(-1, every))
    return x_0, dict(x_t=xs, x0_pred=x0_preds)


def respaced(sched, model_fn, num_steps):
    """(Schedule, model_fn) of a chain over `num_steps` evenly spaced steps of `sched`; the
    network still sees the original step indices. num_steps = T gives the same chain.
    Fixed and learned variances alike come from the respaced β's (Nichol & Dhariwal §4)."""
    timesteps = schedules.space_timesteps(sched.num_timesteps, num_steps)
    betas = schedules.respace_betas(np.asarray(sched.betas, np.float64), timesteps)
    timestep_map = jnp.asarray(timesteps, jnp.int32)
    return schedules.schedule_from_betas(betas), lambda x, t: model_fn(x, timestep_map[t])


def from_shared_x_t(sched, spec, model_fn, x_t, t, keys):
    """Fig. 7: one x_t (a single image at step t) decoded len(keys) times with different
    reverse noise; what the samples share shows what x_t already determines."""
    x = jnp.broadcast_to(x_t[None], (keys.shape[0], *x_t.shape))
    return sample_loop(sched, spec, model_fn, x, keys, t_start=t)


def interpolate(sched, spec, model_fn, x0_a, x0_b, t, lambdas, rng):
    """Fig. 8: diffuse x0_a and x0_b (single images) to step t, decode the latent
    x̄_t = (1-λ) x_t + λ x'_t for each λ, with the same reverse noise for every λ."""
    rng_a, rng_b, rng_reverse = jax.random.split(rng, 3)
    t_1 = jnp.full((1,), t, jnp.int32)
    x_ta = diffusion.q_sample(sched, x0_a[None], t_1, jax.random.normal(rng_a, (1, *x0_a.shape)))
    x_tb = diffusion.q_sample(sched, x0_b[None], t_1, jax.random.normal(rng_b, (1, *x0_b.shape)))
    lam = jnp.asarray(lambdas, x_ta.dtype).reshape(-1, 1, 1, 1)
    x_bar = (1 - lam) * x_ta + lam * x_tb
    keys = jnp.stack([rng_reverse] * lam.shape[0])
    return sample_loop(sched, spec, model_fn, x_bar, keys, t_start=t)


def quantize(x):
    """Images in [-1, 1] -> pixel values k = round((x + 1) · 127.5) in [0, 255], as floats
    (traceable: the FID network applies it inside its jitted function)."""
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255)


def to_uint8(x):
    """Images in [-1, 1] -> uint8 NumPy pixels (quantize)."""
    return np.asarray(quantize(x).astype(jnp.uint8))


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


def chain_length(config):
    """Number of reverse steps config.sampling asks for (all T, or a respaced chain)."""
    return config.sampling.num_steps or config.diffusion.num_timesteps


def segment_length(num_steps, max_segments=20):
    """Steps per segment of a chain (progress is reported between segments): the largest
    divisor of num_steps that is at most ceil(num_steps / max_segments)."""
    return max(k for k in range(1, -(-num_steps // max_segments) + 1) if num_steps % k == 0)


def sample_init(rng, offset, *, config, num_samples):
    """x_T of samples offset .. offset + num_samples - 1 of the stream of `rng`."""
    data = config.data
    keys = example_keys(rng, num_samples, offset)
    shape = (data.image_size, data.image_size, data.num_channels)
    return initial_noise(keys, shape, chain_length(config))


def sample_segment(
    params, rng, offset, x, t_top, labels=None, w=None, *, config, model, sched, length
):  # fmt: skip
    """`length` steps of p_θ from chain step t_top down, for the samples of sample_init:
    config.sampling's chain (num_steps: 0 for all T steps, fewer respace it), method
    ('ancestral' = Algorithm 2, or 'ddim' with eta) and clip_x0. A class model takes one
    label per sample (∅ for none) and the guidance weight w (guidance.py; None for none,
    which costs one network pass per step instead of two)."""
    s, spec = config.sampling, config_lib.diffusion_spec(config)
    apply = lambda x_t, t, y: model.apply({"params": params}, x_t, t, y)
    model_fn = guidance.model_fn(apply, spec, labels, w, guidance.num_classes(config))
    if chain_length(config) != sched.num_timesteps:
        sched, model_fn = respaced(sched, model_fn, s.num_steps)
    keys = example_keys(rng, x.shape[0], offset)
    eta = s.eta if s.method == "ddim" else None
    step = reverse_step_fn(sched, spec, model_fn, keys, eta)
    return reverse_steps(step, x, t_top, length)


def sample(
    params, rng, offset=0, labels=None, w=None, *, config, model, sched, num_samples,
    batch_sharding=None,
):  # fmt: skip
    """num_samples images in [-1, 1] from p_θ, the whole chain in one program: samples
    offset .. offset + num_samples - 1 of the stream of `rng`, sample i depending only on
    (params, rng, i) and, for a class model, its label and w."""
    x_T = sample_init(rng, offset, config=config, num_samples=num_samples)
    if batch_sharding is not None:
        x_T = jax.lax.with_sharding_constraint(x_T, batch_sharding)
    n = chain_length(config)
    return sample_segment(
        params, rng, offset, x_T, n - 1, labels, w,
        config=config, model=model, sched=sched, length=n,
    )  # fmt: skip


class Progress:
    """A progress bar (process 0) whose clock starts at the first update, once the first
    piece of work is done, so that its rate and ETA exclude compilation."""

    def __init__(self, total, enabled, desc="sampling", unit="step"):
        self.total, self.desc, self.unit, self.bar = total, desc, unit, None
        self.enabled = enabled and jax.process_index() == 0

    def update(self, n, x):
        """Count n units once x (their result) is computed; blocks only when shown."""
        if not self.enabled:
            return
        jax.block_until_ready(x)
        if self.bar is None:
            self.bar = tqdm.tqdm(
                total=self.total, initial=n, desc=self.desc, unit=self.unit, dynamic_ncols=True
            )
        else:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def check_num_samples(num_samples):
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise UserError(f"num_samples must be a whole number, got {num_samples!r}")
    if num_samples < 1:
        raise UserError(f"num_samples must be at least 1, got {num_samples}")


def make_sample_fn(config, devices=None, progress=False, desc="sampling"):
    """sample_fn(params, rng, num_samples, output="uint8", labels=None, guidance=None) ->
    NumPy NHWC images.

    A class model takes labels (num_samples ints, or None for unconditional samples) and
    the guidance weight w (default config.sampling.guidance). Any labels share one
    program, and every w > 0 another (two network passes per step); w = 0 runs one pass.

    Samples are drawn in chunks of at most config.sampling.batch_size (a multiple of the
    device count, no larger than num_samples needs), each split over all devices, as
    segments of the chain (sample_segment) so that `progress` can show a bar over reverse
    steps; each chunk size compiles once, the segments share one program. Sample i depends
    only on (params, rng, i) (and its label and w): the result is the same for any chunk
    size or number of devices. output="float" gives [-1, 1] float32 instead.
    """
    config_lib.check_diffusion(config)
    config_lib.check_sampling(config)
    mesh = sharding.make_mesh(devices)
    batch_sh = sharding.batch_sharding(mesh)
    num_steps = chain_length(config)
    length = segment_length(num_steps)
    init = jax.jit(
        functools.partial(sample_init, config=config),
        static_argnames="num_samples",
        out_shardings=batch_sh,
    )
    segment = jax.jit(
        functools.partial(
            sample_segment,
            config=config,
            model=unet.UNet(config_lib.unet_config(config)),
            sched=config_lib.make_schedule(config),
            length=length,
        ),
        out_shardings=batch_sh,
    )
    most = -(-config.sampling.batch_size // mesh.size) * mesh.size

    def chunk_labels(labels, start, size):
        """This chunk's labels as a sharded array (∅ past the end), or None."""
        if labels is None:
            return None
        part = np.full((size,), guidance.num_classes(config), np.int32)
        part[: len(labels[start : start + size])] = labels[start : start + size]
        return jax.make_array_from_callback((size,), batch_sh, lambda index: part[index])

    def chunks(params, rng, num_samples, labels=None, guidance_w=None):
        """The chunks as sharded device arrays in [-1, 1], the last one possibly longer
        than needed (samples past num_samples are extra draws of the same stream)."""
        check_num_samples(num_samples)
        labels, w = guidance.check(config, labels, guidance_w, num_samples)
        size = min(most, -(-num_samples // mesh.size) * mesh.size)
        params = jax.device_put(params, sharding.replicated(mesh))
        w = jax.device_put(jnp.float32(w), sharding.replicated(mesh)) if w else None
        starts = range(0, num_samples, size)
        bar = Progress(len(starts) * num_steps, progress, desc)
        for start in starts:
            offset = jnp.asarray(start, jnp.int32)
            x, y = init(rng, offset, num_samples=size), chunk_labels(labels, start, size)
            for t_top in range(num_steps - 1, -1, -length):
                x = segment(params, rng, offset, x, jnp.asarray(t_top, jnp.int32), y, w)
                bar.update(length, x)
            yield x
        bar.close()

    def sample_fn(params, rng, num_samples, output="uint8", labels=None, guidance=None):
        if output not in ("uint8", "float"):
            raise UserError(f"output must be 'uint8' or 'float', got {output!r}")
        # Kept on the devices; gathered to every host once, at the end.
        chunks_ = [
            c.block_until_ready() for c in chunks(params, rng, num_samples, labels, guidance)
        ]
        gathered = multihost_utils.process_allgather(chunks_, tiled=True)
        images = np.concatenate([np.asarray(c) for c in gathered])[:num_samples]
        return to_uint8(images) if output == "uint8" else images

    sample_fn.segment = segment  # exposed so that callers can check it compiles once
    sample_fn.chunks = chunks
    return sample_fn
