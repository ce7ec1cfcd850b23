"""The mathematics of DDPM (Ho, Jain, Abbeel 2020) as pure JAX functions.

Forward process q(x_t|x_0), posterior q(x_{t-1}|x_t,x_0), reverse process p_θ(x_{t-1}|x_t)
from a network output, the training losses and the variational bound in bits/dim; and
what came after the paper: learned variances and the hybrid loss (Nichol & Dhariwal
2021), v-prediction (Salimans & Ho 2022), an L1 loss and DDIM steps (Song et al. 2021).
No Flax and no config objects: a `Schedule` (schedules.py), a `DiffusionSpec` (spec.py)
and arrays in, arrays out.

Conventions: images NHWC in [-1, 1]; `t` is a 0-based int array of shape
(B,), `t = 0` being the paper's step 1; bits/dim are nats averaged over all dimensions
divided by ln 2.
"""

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from ddpm_jax.schedules import Schedule
from ddpm_jax.spec import (  # noqa: F401 (re-exported: the spec is part of this API)
    LOSS_TYPES,
    MEAN_TYPES,
    VAR_TYPES,
    DiffusionSpec,
    LossType,
    MeanType,
    VarType,
    split_output,
)

Array = jax.Array


def _at(table, t, x):
    """table[t] shaped to broadcast against x of shape (B, ...)."""
    return table[t].astype(x.dtype).reshape((t.shape[0],) + (1,) * (x.ndim - 1))


def mean_flat(x: Array) -> Array:
    """Mean over every axis but the batch axis."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# ---- Forward process ----------------------------------------------------------------


def q_mean_variance(sched: Schedule, x0: Array, t: Array) -> tuple[Array, Array, Array]:
    """q(x_t|x_0) = N(√ᾱ_t x_0, (1-ᾱ_t) I) (eq. 4): mean, variance, log variance."""
    mean = _at(sched.sqrt_alphas_cumprod, t, x0) * x0
    variance = jnp.square(_at(sched.sqrt_one_minus_alphas_cumprod, t, x0))
    log_variance = _at(sched.log_one_minus_alphas_cumprod, t, x0)
    return mean, variance, log_variance


def q_sample(sched: Schedule, x0: Array, t: Array, eps: Array) -> Array:
    """x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε, a draw from q(x_t|x_0) (eq. 4) given ε ~ N(0, I)."""
    return _at(sched.sqrt_alphas_cumprod, t, x0) * x0 + (
        _at(sched.sqrt_one_minus_alphas_cumprod, t, x0) * eps
    )


def q_posterior_mean_variance(
    sched: Schedule, x0: Array, x_t: Array, t: Array
) -> tuple[Array, Array, Array]:
    """q(x_{t-1}|x_t,x_0) = N(μ̃_t, β̃_t I) (eq. 6-7): mean, variance, clipped log variance."""
    mean = _at(sched.posterior_mean_coef1, t, x_t) * x0 + (
        _at(sched.posterior_mean_coef2, t, x_t) * x_t
    )
    variance = _at(sched.posterior_variance, t, x_t)
    log_variance = _at(sched.posterior_log_variance_clipped, t, x_t)
    return mean, variance, log_variance


# ---- Reverse process ----------------------------------------------------------------


def predict_x0_from_eps(sched: Schedule, x_t: Array, t: Array, eps: Array) -> Array:
    """x̂_0 = (x_t - √(1-ᾱ_t) ε) / √ᾱ_t, eq. 4 solved for x_0 (the form used in eq. 15)."""
    return _at(sched.sqrt_recip_alphas_cumprod, t, x_t) * x_t - (
        _at(sched.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
    )


def predict_eps_from_x0(sched: Schedule, x_t: Array, t: Array, x0: Array) -> Array:
    """ε̂ = (x_t/√ᾱ_t - x̂_0) / √(1/ᾱ_t - 1), eq. 4 solved for ε."""
    return (_at(sched.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / _at(
        sched.sqrt_recipm1_alphas_cumprod, t, x_t
    )


def predict_x0_from_xprev(sched: Schedule, x_t: Array, t: Array, xprev: Array) -> Array:
    """x̂_0 from a predicted mean x_{t-1} = μ̃_t: eq. 7 solved for x_0."""
    coef1 = _at(sched.posterior_mean_coef1, t, x_t)
    coef2 = _at(sched.posterior_mean_coef2, t, x_t)
    return (xprev - coef2 * x_t) / coef1


def predict_x0_from_v(sched: Schedule, x_t: Array, t: Array, v: Array) -> Array:
    """x̂_0 = √ᾱ_t x_t - √(1-ᾱ_t) v, from v = √ᾱ_t ε - √(1-ᾱ_t) x_0 and eq. 4."""
    return _at(sched.sqrt_alphas_cumprod, t, x_t) * x_t - (
        _at(sched.sqrt_one_minus_alphas_cumprod, t, x_t) * v
    )


def v_target(sched: Schedule, x0: Array, t: Array, eps: Array) -> Array:
    """v = √ᾱ_t ε - √(1-ᾱ_t) x_0 (Salimans & Ho 2022), the target of mean_type 'v'."""
    return _at(sched.sqrt_alphas_cumprod, t, x0) * eps - (
        _at(sched.sqrt_one_minus_alphas_cumprod, t, x0) * x0
    )


def model_variance(
    sched: Schedule, spec: DiffusionSpec, x_t: Array, t: Array, var_output: Array | None = None
) -> tuple[Array, Array]:
    """Σ_θ = σ²_t I as (variance, log variance). Fixed (§3.2): 'fixedsmall' σ² = β̃_t,
    'fixedlarge' σ² = β_t; at t=0 both take log β̃ of the first nonzero entry (the
    discretized decoder needs a finite scale). 'learned_range': the network's var_output
    in [-1, 1] is v = (var_output + 1)/2 and log Σ = v log β_t + (1-v) log β̃_t (Nichol &
    Dhariwal eq. 15), with β̃'s clipped log; at t=0 it spans [log β̃_2, log β_1]."""
    if spec.var_type == VarType.FIXED_SMALL:
        return _at(sched.posterior_variance, t, x_t), _at(
            sched.posterior_log_variance_clipped, t, x_t
        )
    if spec.var_type == VarType.FIXED_LARGE:
        return _at(sched.betas, t, x_t), _at(sched.large_log_variance, t, x_t)
    frac = (var_output + 1.0) / 2.0
    min_log = _at(sched.posterior_log_variance_clipped, t, x_t)
    max_log = jnp.log(_at(sched.betas, t, x_t))
    log_variance = frac * max_log + (1.0 - frac) * min_log
    return jnp.exp(log_variance), log_variance


def predict_x0(
    sched: Schedule, spec: DiffusionSpec, mean_output: Array, x_t: Array, t: Array
) -> Array:
    """x̂_0 implied by the mean part of the network output, for any mean type (unclipped)."""
    predict = {
        MeanType.EPS: predict_x0_from_eps,
        MeanType.XPREV: predict_x0_from_xprev,
        MeanType.V: predict_x0_from_v,
    }.get(spec.mean_type)
    return mean_output if predict is None else predict(sched, x_t, t, mean_output)


def p_mean_variance(
    sched: Schedule, spec: DiffusionSpec, model_output: Array, x_t: Array, t: Array
) -> dict[str, Array]:
    """p_θ(x_{t-1}|x_t) = N(μ_θ, Σ_θ) from the network output (eq. 1, 11): dict of mean,
    variance, log_variance and the implied x̂_0 (clipped to [-1, 1] if spec.clip_x0)."""
    mean_output, var_output = split_output(spec, model_output)
    variance, log_variance = model_variance(sched, spec, x_t, t, var_output)
    x0_pred = predict_x0(sched, spec, mean_output, x_t, t)
    if spec.clip_x0:
        x0_pred = jnp.clip(x0_pred, -1.0, 1.0)
    if spec.mean_type == MeanType.XPREV:
        mean = mean_output
    else:
        mean, _, _ = q_posterior_mean_variance(sched, x0_pred, x_t, t)
    return dict(mean=mean, variance=variance, log_variance=log_variance, x0_pred=x0_pred)


def _nonzero(t, x):
    return (t != 0).astype(x.dtype).reshape((t.shape[0],) + (1,) * (x.ndim - 1))


def ancestral_step(
    sched: Schedule, spec: DiffusionSpec, model_output: Array, x_t: Array, t: Array, z: Array
) -> tuple[Array, Array]:
    """(x_{t-1}, x̂_0): the ancestral step x_{t-1} = μ_θ + σ_t z (Algorithm 2, line 4; no
    noise at t=0). DDIM's step is ddim_step, with the same arguments and η."""
    out = p_mean_variance(sched, spec, model_output, x_t, t)
    x_prev = out["mean"] + _nonzero(t, x_t) * jnp.exp(0.5 * out["log_variance"]) * z
    return x_prev, out["x0_pred"]


def p_sample(
    sched: Schedule, spec: DiffusionSpec, model_output: Array, x_t: Array, t: Array, z: Array
) -> Array:
    """One ancestral step x_{t-1} = μ_θ + σ_t z (Algorithm 2, line 4); no noise at t=0."""
    return ancestral_step(sched, spec, model_output, x_t, t, z)[0]


# ---- Likelihood terms -----------------------------------------------------------------


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats (for eq. 5).

    Written with expm1 so that nearly equal variances (e.g. the prior term) keep precision.
    """
    return 0.5 * (
        logvar2
        - logvar1
        + jnp.expm1(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: Array) -> Array:
    """Φ(x) ≈ ½(1 + tanh(√(2/π)(x + 0.044715 x³))), the approximation the authors use."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Array, means: Array, log_scales: Array) -> Array:
    """log p(x) of the discretized Gaussian decoder of eq. 13, elementwise, in nats.

    x holds pixel values k/127.5 - 1; each bin has half-width 1/255 and the edge bins
    extend to ±∞. `log_scales` is log σ (half the log variance).
    """
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(
        x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    )


def prior_bpd(sched: Schedule, x0: Array) -> Array:
    """L_T = KL(q(x_T|x_0) || N(0, I)) in bits/dim per example (eq. 5)."""
    t = jnp.full((x0.shape[0],), sched.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_variance = q_mean_variance(sched, x0, t)
    kl = normal_kl(mean, log_variance, jnp.zeros_like(mean), jnp.zeros_like(log_variance))
    return mean_flat(kl) / math.log(2.0)


def vb_terms_bpd(
    sched: Schedule, spec: DiffusionSpec, model_output: Array, x0: Array, x_t: Array, t: Array
) -> tuple[Array, Array]:
    """L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p_θ(x_{t-1}|x_t)) for t>0 and the decoder
    L_0 = -log p_θ(x_0|x_1) at t=0 (eq. 5, 13), in bits/dim per example; also x̂_0."""
    true_mean, _, true_log_variance = q_posterior_mean_variance(sched, x0, x_t, t)
    out = p_mean_variance(sched, spec, model_output, x_t, t)
    kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
    kl = mean_flat(kl) / math.log(2.0)
    log_px0 = discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
    decoder_nll = -mean_flat(log_px0) / math.log(2.0)
    return jnp.where(t == 0, decoder_nll, kl), out["x0_pred"]


# ---- Training losses --------------------------------------------------------------------


def l_simple(model_output: Array, target: Array) -> Array:
    """L_simple = ‖target - model output‖² averaged per example (eq. 14 with target ε)."""
    return mean_flat(jnp.square(target - model_output))


def training_target(
    sched: Schedule, spec: DiffusionSpec, x0: Array, x_t: Array, t: Array, eps: Array
) -> Array:
    """What the mean part of the network output is trained towards: ε, x_0, μ̃_t or v."""
    if spec.mean_type == MeanType.EPS:
        return eps
    if spec.mean_type == MeanType.X0:
        return x0
    if spec.mean_type == MeanType.V:
        return v_target(sched, x0, t, eps)
    return q_posterior_mean_variance(sched, x0, x_t, t)[0]


def training_losses(
    sched: Schedule, spec: DiffusionSpec, model_output: Array, x0: Array, x_t: Array, t: Array,
    eps: Array,
) -> Array:  # fmt: skip
    """Per-example training loss. 'mse' is L_simple (eq. 14) against the mean type's target,
    'l1' its mean absolute error, 'kl' the bound term L_{t-1} (eq. 5) in bits/dim, and
    'hybrid' L_simple + λ·T·L_{t-1}: T·L_{t-1} estimates L_vlb = Σ_t L_t for a uniform t,
    and the mean part is frozen in it so that it trains Σ_θ alone (Nichol & Dhariwal
    eq. 16). The bound is computed with x̂_0 unclipped."""
    bound_spec = dataclasses.replace(spec, clip_x0=False)
    if spec.loss_type == LossType.KL:
        return vb_terms_bpd(sched, bound_spec, model_output, x0, x_t, t)[0]
    mean_output, var_output = split_output(spec, model_output)
    error = training_target(sched, spec, x0, x_t, t, eps) - mean_output
    if spec.loss_type == LossType.L1:
        return mean_flat(jnp.abs(error))
    loss = mean_flat(jnp.square(error))
    if spec.loss_type == LossType.HYBRID:
        frozen = jnp.concatenate([jax.lax.stop_gradient(mean_output), var_output], axis=-1)
        vb = vb_terms_bpd(sched, bound_spec, frozen, x0, x_t, t)[0]
        loss = loss + spec.hybrid_lambda * sched.num_timesteps * vb
    return loss


# ---- The full variational bound ---------------------------------------------------------


def _is_key(x):
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key) or jnp.issubdtype(x.dtype, jnp.integer)


def example_keys(rng: Array, indices: Array) -> Array:
    """One key per example, fold_in(rng, i) for each index i: example i's noise then
    depends on (rng, i) alone, not on the batch it is in, its size or the devices."""
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(indices)


def keyed_normal(keys: Array, t, shape: tuple[int, ...]) -> Array:
    """Per-example N(0, I) of the given shape from fold_in(key_i, t) (float32)."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t), shape))(keys)


def step_noise(noise, t, x: Array) -> Array:
    """The N(0, I) draw of step t, shaped like x, from `noise`: a function t -> array; an
    array holding one draw per step on axis 0 (indexed by t); one PRNG key
    (fold_in(key, t)); or one key per example (fold_in(key_i, t)), so that example i's
    noise depends on its key alone, not on the batch it is in."""
    if callable(noise):
        return noise(t).astype(x.dtype)
    if not _is_key(noise):
        return noise[t].astype(x.dtype)
    typed = jnp.issubdtype(noise.dtype, jax.dtypes.prng_key)
    if noise.ndim == (1 if typed else 2):
        return keyed_normal(noise, t, x.shape[1:]).astype(x.dtype)
    return jax.random.normal(jax.random.fold_in(noise, t), x.shape).astype(x.dtype)


def bpd_loop(
    sched: Schedule, spec: DiffusionSpec, model_fn: Callable, x0: Array, noise
) -> dict[str, Array]:
    """The whole bound L = L_T + Σ_{t=1}^T L_{t-1} (eq. 5) in bits/dim, by `lax.scan` over t.

    model_fn(x_t, t) -> network output. The ε of step t is step_noise(noise, t, x0): one
    key, one key per example, a function of t or an array (T, *x0.shape). Returns
    per-example `total_bpd` and `prior_bpd` (B,), and per-step `terms_bpd`, `x0_mse`,
    `eps_mse` (B, T) indexed by 0-based t; the ε of `eps_mse` is the one implied by x̂_0.
    Memory does not grow with T beyond these tables.
    """
    batch = x0.shape[0]

    def step(_, t):
        t_b = jnp.full((batch,), t, dtype=jnp.int32)
        eps = step_noise(noise, t, x0)
        x_t = q_sample(sched, x0, t_b, eps)
        vb, x0_pred = vb_terms_bpd(sched, spec, model_fn(x_t, t_b), x0, x_t, t_b)
        eps_pred = predict_eps_from_x0(sched, x_t, t_b, x0_pred)
        terms = (vb, l_simple(x0_pred, x0), l_simple(eps_pred, eps))
        return None, terms

    ts = jnp.arange(sched.num_timesteps - 1, -1, -1, dtype=jnp.int32)
    _, (vb, x0_mse, eps_mse) = jax.lax.scan(step, None, ts)
    # Scanned from t = T-1 down to 0; flip so that column t is step t.
    terms_bpd, x0_mse, eps_mse = (jnp.flip(a, axis=0).T for a in (vb, x0_mse, eps_mse))
    prior = prior_bpd(sched, x0)
    return dict(
        total_bpd=jnp.sum(terms_bpd, axis=1) + prior,
        prior_bpd=prior,
        terms_bpd=terms_bpd,
        x0_mse=x0_mse,
        eps_mse=eps_mse,
    )


# ---- Fast sampling ----------------------------------------------------------------------


def ddim_step(
    sched: Schedule, spec: DiffusionSpec, model_output: Array, x_t: Array, t: Array, z: Array,
    eta: float,
) -> tuple[Array, Array]:  # fmt: skip
    """One DDIM step (Song et al. 2021, eq. 12): x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1-ᾱ_{t-1}-σ²) ε̂
    + σ z with σ = η √((1-ᾱ_{t-1})/(1-ᾱ_t)) √(1-ᾱ_t/ᾱ_{t-1}); η=1 is ancestral sampling
    with σ² = β̃ (given a consistent ε̂), η=0 is deterministic. Returns (x_{t-1}, x̂_0)."""
    x0_pred = p_mean_variance(sched, spec, model_output, x_t, t)["x0_pred"]
    eps = predict_eps_from_x0(sched, x_t, t, x0_pred)
    ab, ab_prev = _at(sched.alphas_cumprod, t, x_t), _at(sched.alphas_cumprod_prev, t, x_t)
    sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    mean = jnp.sqrt(ab_prev) * x0_pred + jnp.sqrt(jnp.maximum(1 - ab_prev - sigma**2, 0.0)) * eps
    return mean + _nonzero(t, x_t) * sigma * z, x0_pred
