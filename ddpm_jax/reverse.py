"""The reverse process p_θ as chains of `lax.scan`: Algorithm 2, DDIM, respaced chains, the
progression of Fig. 6 and the Fig. 7 and 8 helpers.

x_T ~ N(0, I); for t = T-1, ..., 0: x_{t-1} = μ_θ(x_t, t) + σ_t z, z = 0 at t = 0 (Algorithm
2), or a DDIM step (Song et al. 2021, eq. 12). Compiled once per (batch shape, chain
length): the loop body is traced once, nothing is unrolled, and no trajectory is stored
unless asked for. Everything here takes the typed setup (spec.py), never a config.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, guidance, schedules, solvers
from ddpm_jax.guidance import ModelFn  # (x_t, t) -> network output
from ddpm_jax.schedules import Schedule
from ddpm_jax.spec import DiffusionSpec, SamplerMethod, SamplerSpec, Setup

StepFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]  # -> (x_{t-1}, x̂_0)
ANCESTRAL = SamplerSpec()


def example_keys(rng: jax.Array, num_samples: int, offset=0) -> jax.Array:
    """The keys of samples offset .. offset + num_samples - 1 (diffusion.example_keys): sample
    i's noise depends on (rng, i) alone, not on the batch size, the chunking or the number
    of devices."""
    return diffusion.example_keys(rng, offset + jnp.arange(num_samples))


keyed_normal = diffusion.keyed_normal  # per-sample N(0, I) from fold_in(key_i, t)


def initial_noise(keys: jax.Array, shape: tuple[int, ...], num_timesteps: int) -> jax.Array:
    """x_T ~ N(0, I) per sample (index T is never a step's z, which uses 0..T-1)."""
    return keyed_normal(keys, num_timesteps, shape)


def diffusion_step(sampler: SamplerSpec) -> Callable:
    """The step of the sampler's method, step(sched, spec, model_output, x_t, t, z) ->
    (x_{t-1}, x̂_0): diffusion.ancestral_step (Algorithm 2) or diffusion.ddim_step with η."""
    if sampler.method == SamplerMethod.DDIM:
        return functools.partial(diffusion.ddim_step, eta=sampler.eta)
    return diffusion.ancestral_step


def reverse_step_fn(
    sched: Schedule, spec: DiffusionSpec, model_fn: ModelFn, noise, sampler=ANCESTRAL
) -> StepFn:
    """step(x_t, t) -> (x_{t-1}, x̂_0) for a traced scalar t: the sampler's step on the
    network output, with the z of step t from diffusion.step_noise(noise, t, x_t)."""
    one_step = diffusion_step(sampler)

    def step(x_t, t):
        t_b = jnp.full((x_t.shape[0],), t, dtype=jnp.int32)
        z = diffusion.step_noise(noise, t, x_t)
        return one_step(sched, spec, model_fn(x_t, t_b), x_t, t_b, z)

    return step


def reverse_steps(step: StepFn, x: jax.Array, t_top, length: int) -> jax.Array:
    """`length` reverse steps t_top, t_top - 1, ... of step(x_t, t) -> (x_{t-1}, x̂_0), as one
    `lax.scan`; t_top may be traced, so every segment of a chain shares one program."""
    ts = t_top - jnp.arange(length, dtype=jnp.int32)
    return jax.lax.scan(lambda x, t: (step(x, t)[0], None), x, ts)[0]


def sample_loop(
    sched: Schedule, spec: DiffusionSpec, model_fn: ModelFn, x_T: jax.Array, noise,
    t_start=None, sampler: SamplerSpec = ANCESTRAL, every: int | None = None,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:  # fmt: skip
    """Run p_θ from x_T down to x_0 (Algorithm 2). model_fn(x_t, t) -> network output; the
    z of step t is diffusion.step_noise(noise, t, x): noise is one key per sample
    (example_keys), a function of t, or an array with one draw per step on axis 0.

    t_start (default T-1) starts the chain at an intermediate step with x_T taken as
    x_{t_start}. sampler picks the method (DDIM with its η: 0 is deterministic). With
    `every` = k, also returns the progression (Fig. 6): x_t and x̂_0 after every k steps,
    stacked on axis 0.
    """
    t_start = sched.num_timesteps - 1 if t_start is None else t_start
    step = reverse_step_fn(sched, spec, model_fn, noise, sampler)
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


def respaced(sched: Schedule, model_fn: ModelFn, num_steps: int) -> tuple[Schedule, ModelFn]:
    """(Schedule, model_fn) of a chain over `num_steps` evenly spaced steps of `sched`; the
    network still sees the original step indices. num_steps = T gives the same chain.
    Fixed and learned variances alike come from the respaced β's (Nichol & Dhariwal §4)."""
    timesteps = schedules.space_timesteps(sched.num_timesteps, num_steps)
    betas = schedules.respace_betas(np.asarray(sched.betas, np.float64), timesteps)
    timestep_map = jnp.asarray(timesteps, jnp.int32)
    return schedules.schedule_from_betas(betas), lambda x, t: model_fn(x, timestep_map[t])


def from_shared_x_t(
    sched: Schedule, spec: DiffusionSpec, model_fn: ModelFn, x_t: jax.Array, t: int, keys
) -> jax.Array:
    """Fig. 7: one x_t (a single image at step t) decoded len(keys) times with different
    reverse noise; what the samples share shows what x_t already determines."""
    x = jnp.broadcast_to(x_t[None], (keys.shape[0], *x_t.shape))
    return sample_loop(sched, spec, model_fn, x, keys, t_start=t)


def interpolate(
    sched: Schedule, spec: DiffusionSpec, model_fn: ModelFn, x0_a: jax.Array, x0_b: jax.Array,
    t: int, lambdas, rng: jax.Array,
) -> jax.Array:  # fmt: skip
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


def segment_length(num_steps: int, max_segments: int = 20) -> int:
    """Steps per segment of a chain (progress is reported between segments): the largest
    divisor of num_steps that is at most ceil(num_steps / max_segments)."""
    return max(k for k in range(1, -(-num_steps // max_segments) + 1) if num_steps % k == 0)


def sample_init(rng: jax.Array, offset, *, setup: Setup, num_samples: int) -> jax.Array:
    """x_T of samples offset .. offset + num_samples - 1 of the stream of `rng`."""
    keys = example_keys(rng, num_samples, offset)
    return initial_noise(keys, setup.image_shape, setup.sampler.num_steps)


def sample_segment(
    params, rng: jax.Array, offset, x: jax.Array, t_top, labels=None, w=None, *,
    setup: Setup, length: int,
) -> jax.Array:  # fmt: skip
    """`length` steps of p_θ from chain step t_top down, for the samples of sample_init:
    setup.sampler's chain (num_steps < T respaces it) and method, with x̂_0 clipped as
    setup.diffusion says. A class model takes one label per sample (∅ for none) and the
    guidance weight w (guidance.py; None for none, which costs one network pass per step
    instead of two). A multistep solver (solvers.py) runs the whole chain: length is
    num_steps and t_top its first step."""
    apply = lambda x_t, t, y: setup.model.apply({"params": params}, x_t, t, y)  # noqa: E731
    model_fn = guidance.model_fn(apply, setup.diffusion, labels, w, setup.num_classes)
    sched, sampler = setup.schedule, setup.sampler
    if sampler.method.multistep:  # the whole chain (length = num_steps), from x_T
        ts = solvers.spaced_timesteps(sched.num_timesteps, sampler.num_steps, sampler.spacing)
        keys = example_keys(rng, x.shape[0], offset)
        return solvers.solve(sched, setup.diffusion, model_fn, x, ts, sampler.method, keys)
    if setup.respaced:
        sched, model_fn = respaced(sched, model_fn, setup.sampler.num_steps)
    keys = example_keys(rng, x.shape[0], offset)
    step = reverse_step_fn(sched, setup.diffusion, model_fn, keys, setup.sampler)
    return reverse_steps(step, x, t_top, length)


def sample(
    params, rng: jax.Array, offset=0, labels=None, w=None, *, setup: Setup, num_samples: int,
    batch_sharding=None,
) -> jax.Array:  # fmt: skip
    """num_samples images in [-1, 1] from p_θ, the whole chain in one program: samples
    offset .. offset + num_samples - 1 of the stream of `rng`, sample i depending only on
    (params, rng, i) and, for a class model, its label and w."""
    x_T = sample_init(rng, offset, setup=setup, num_samples=num_samples)
    if batch_sharding is not None:
        x_T = jax.lax.with_sharding_constraint(x_T, batch_sharding)
    n = setup.sampler.num_steps
    return sample_segment(params, rng, offset, x_T, n - 1, labels, w, setup=setup, length=n)
