"""Editing given images with a trained model: DDIM inversion, SDEdit and RePaint.

Masks are 1 where the model regenerates the image and 0 where the given image is kept
(broadcast over channels and, for a single mask, over the batch).

- DDIM inversion (Song et al. 2021, the deterministic chain run upwards), as diffusers'
  `DDIMInverseScheduler`: over increasing timesteps t_0 < ... < t_{N-1}, step k takes x
  from the level of t_{k-1} (ᾱ = 1 before t_0) to t_k with the network evaluated at label
  t_k: x ← √ᾱ_{t_k} x̂_0 + √(1-ᾱ_{t_k}) ε̂, x̂_0 and ε̂ read from its output at the level x
  is at. DDIM sampling over the same timesteps, reversed, then reconstructs x_0.
- SDEdit (Meng et al. 2022): x_0 noised to t = strength·T by q(x_t | x_0) and solved back by
  any solver (solvers.py) or by Algorithm 2; with a mask, the kept region is replaced after
  every step by a fresh draw of q(x_t | x_0) at the step's level (x_0 itself at the end).
- RePaint (Lugmayr et al. 2022, Algorithm 1 with its jump schedule): Algorithm 2 in which,
  after every reverse step, the kept region is a draw of q(x_{t-1} | x_0); every
  `jump_length` steps the chain goes back up that many steps by q(x_t | x_{t-1}) and down
  again, `jump_n_sample` - 1 times, so that the regenerated region harmonizes with the kept.

Noise is keyed per sample as for sampling (diffusion.step_noise with one key per sample),
so sample i depends on (key_i, x_0^i) alone.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, solvers
from ddpm_jax.guidance import ModelFn
from ddpm_jax.schedules import Schedule
from ddpm_jax.spec import DiffusionSpec, MeanType, SamplerMethod, split_output

# Disjoint noise streams of a sample's key: a step's own draw, the kept region's, the start.
KEPT_NOISE, START_NOISE = 1 << 20, 1 << 21


def inversion_coefficients(alphas_cumprod, timesteps, mean_type) -> np.ndarray:
    """(N, 2) float64: x ← k_0 x + k_1 f(x, t_k) for step k of DDIM inversion, f the network.
    ε: x̂_0 = (x - σ ε)/α; v: x̂_0 = α x - σ v, ε̂ = α v + σ x (α, σ of the level x is at)."""
    ab = np.asarray(alphas_cumprod, np.float64)[np.asarray(timesteps)]
    a_to, s_to = np.sqrt(ab), np.sqrt(1 - ab)
    a_at, s_at = np.append(1.0, a_to[:-1]), np.append(0.0, s_to[:-1])
    if MeanType(mean_type) == MeanType.EPS:
        return np.stack([a_to / a_at, s_to - a_to * s_at / a_at], axis=1)
    if MeanType(mean_type) == MeanType.V:
        return np.stack([a_to * a_at + s_to * s_at, s_to * a_at - a_to * s_at], axis=1)
    raise ValueError(
        f"DDIM inversion reads ε̂ at ᾱ = 1, which a model of mean type {mean_type!r} does "
        "not give: it needs an 'eps' or 'v' model"
    )


def invert(
    sched: Schedule, spec: DiffusionSpec, model_fn: ModelFn, x_0: jax.Array, timesteps,
    trajectory: bool = False,
) -> jax.Array:  # fmt: skip
    """x at timesteps[-1] from x_0 by DDIM inversion over increasing `timesteps` (module
    docstring), one `lax.scan`; x̂_0 is never clipped (clipping is not invertible). A
    learned-range model's variance half is ignored."""
    timesteps = np.asarray(timesteps, np.int32)
    if timesteps.ndim != 1 or np.any(np.diff(timesteps) <= 0):
        raise ValueError(f"inversion timesteps must be strictly increasing, got {timesteps}")
    k = inversion_coefficients(sched.alphas_cumprod, timesteps, spec.mean_type)

    def step(x, inputs):
        t, k_t = inputs
        out = split_output(spec, model_fn(x, jnp.full((x.shape[0],), t, jnp.int32)))[0]
        x = k_t[0] * x + k_t[1] * out
        return x, (x if trajectory else None)

    x_T, xs = jax.lax.scan(step, x_0, (jnp.asarray(timesteps), jnp.asarray(k, x_0.dtype)))
    return xs if trajectory else x_T


def strength_timesteps(timesteps, strength: float) -> np.ndarray:
    """The last round(strength·N) of a solver's N decreasing timesteps (diffusers'
    img2img): strength 1 is the whole chain, 0 none (the input comes back)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must lie in [0, 1], got {strength}")
    timesteps = np.asarray(timesteps, np.int32)
    return timesteps[len(timesteps) - int(round(strength * len(timesteps))) :]


def kept(sched: Schedule, x_0: jax.Array, keys: jax.Array, index, level) -> jax.Array:
    """q(x_level | x_0) with the noise of `index` (x_0 itself at level -1): what the
    kept region of a mask is at that level. level may be traced."""
    t = jnp.full((x_0.shape[0],), jnp.maximum(level, 0), jnp.int32)
    x_t = diffusion.q_sample(sched, x_0, t, diffusion.step_noise(keys, index, x_0))
    return jnp.where(level >= 0, x_t, x_0)


def noised(sched: Schedule, x_0: jax.Array, keys: jax.Array, level: int) -> jax.Array:
    """x_0 diffused to `level` by q(x_t | x_0), SDEdit's start."""
    return kept(sched, x_0, keys, START_NOISE, level)


def sdedit(
    sched: Schedule, spec: DiffusionSpec, model_fn: ModelFn, x_0: jax.Array, timesteps,
    keys: jax.Array, solver=SamplerMethod.DPMPP_2M, mask=None,
) -> jax.Array:  # fmt: skip
    """SDEdit by a solver over `timesteps` (strength_timesteps of its chain; none: x_0
    back): x_0 noised to timesteps[0], then solvers.solve (SamplerMethod.DDIM is its first
    order, η = 0) to x_0, the kept region of `mask` projected after every step. Algorithm 2
    is repaint(..., jump_n_sample=1, top=t_0) on its chain."""
    timesteps = np.asarray(timesteps, np.int32)
    if len(timesteps) == 0:
        return x_0
    x = noised(sched, x_0, keys, int(timesteps[0]))
    project = None
    if mask is not None:
        levels = jnp.asarray(np.append(timesteps[1:], -1))

        def project(x, i):
            return mask * x + (1 - mask) * kept(sched, x_0, keys, KEPT_NOISE + i, levels[i])

    return solvers.solve(sched, spec, model_fn, x, timesteps, solver, keys, project=project)


def repaint_levels(num_steps: int, jump_length=10, jump_n_sample=10, top=None) -> np.ndarray:
    """The levels RePaint's chain visits (the paper's jump schedule), from `top` (default
    num_steps - 1: x_T) down to -1 (x_0): a level at a time, and on reaching a level
    0, j, 2j, ... below top + 1 - j (j = jump_length) up j levels and down again,
    jump_n_sample - 1 times. jump_n_sample = 1 is the plain chain."""
    top = num_steps - 1 if top is None else top
    if jump_length < 1 or jump_n_sample < 1 or not 0 <= top < num_steps:
        raise ValueError(
            f"RePaint needs jump_length >= 1, jump_n_sample >= 1 and 0 <= top < {num_steps}; "
            f"got {jump_length}, {jump_n_sample}, {top}"
        )
    jumps = {t: jump_n_sample - 1 for t in range(0, top + 1 - jump_length, jump_length)}
    levels, t = [top], top
    while t >= 0:
        t -= 1
        levels.append(t)
        while jumps.get(t, 0) > 0:
            jumps[t] -= 1
            levels += list(range(t + 1, t + jump_length + 1)) + list(
                range(t + jump_length - 1, t - 1, -1)
            )
    return np.asarray(levels, np.int32)


def repaint(
    sched: Schedule, spec: DiffusionSpec, model_fn: ModelFn, x_0: jax.Array, mask: jax.Array,
    keys: jax.Array, levels,
) -> jax.Array:  # fmt: skip
    """RePaint over repaint_levels(...) as one `lax.scan` of its transitions: a step down
    from level l is Algorithm 2 at l, the kept region then a draw of q(x_{l-1} | x_0); a
    step up is q(x_{l+1} | x_l) = N(√(1-β_{l+1}) x_l, β_{l+1} I). Starts from x_0 noised to
    levels[0] (from x_T ~ N(0, I) where levels[0] is T-1)."""
    levels = np.asarray(levels, np.int32)
    x = noised(sched, x_0, keys, int(levels[0]))
    if levels[0] == sched.num_timesteps - 1:  # x_T ~ N(0, I), as sampling starts
        x = diffusion.step_noise(keys, START_NOISE, x_0)

    def down(x, k, level):
        t = jnp.full((x.shape[0],), level, jnp.int32)
        z = diffusion.step_noise(keys, k, x)
        x_prev = diffusion.ancestral_step(sched, spec, model_fn(x, t), x, t, z)[0]
        return mask * x_prev + (1 - mask) * kept(sched, x_0, keys, KEPT_NOISE + k, level - 1)

    def up(x, k, level):
        beta = sched.betas[level + 1]
        return jnp.sqrt(1 - beta) * x + jnp.sqrt(beta) * diffusion.step_noise(keys, k, x)

    def step(x, inputs):
        k, level, going_down = inputs
        return jax.lax.cond(going_down, down, up, x, k, level), None

    moves = (
        jnp.arange(len(levels) - 1),
        jnp.asarray(levels[:-1]),
        jnp.asarray(np.diff(levels) < 0),
    )
    return jax.lax.scan(step, x, moves)[0]
