"""The mathematics of DDPM (Ho, Jain, Abbeel 2020) as pure JAX functions.

Forward process q(x_t|x_0), posterior q(x_{t-1}|x_t,x_0), reverse process p_θ(x_{t-1}|x_t)
from a network output, the training losses and the variational bound in bits/dim.
No Flax and no config objects: a `Schedule` (see schedules.py) and arrays in, arrays out.

Conventions (DESIGN.md §2): images NHWC in [-1, 1]; `t` is a 0-based int array of shape
(B,), `t = 0` being the paper's step 1; bits/dim are nats averaged over all dimensions
divided by ln 2.
"""

import math

import jax
import jax.numpy as jnp

from ddpm_jax.errors import UserError
from ddpm_jax.schedules import Schedule

MEAN_TYPES = ("eps", "x0", "xprev")  # what the network predicts (§3.2)
VAR_TYPES = ("fixedsmall", "fixedlarge")  # σ²_t = β̃_t or β_t (§3.2)
LOSS_TYPES = ("mse", "kl")  # L_simple (eq. 14) or the true bound (eq. 5)


def check_choice(name, value, choices):
    """Raise a UserError naming `name` unless `value` is one of `choices`."""
    if value not in choices:
        raise UserError(f"unknown {name} {value!r}; choose one of {choices}")


def _at(table, t, x):
    """table[t] shaped to broadcast against x of shape (B, ...)."""
    return table[t].astype(x.dtype).reshape((t.shape[0],) + (1,) * (x.ndim - 1))


def mean_flat(x):
    """Mean over every axis but the batch axis."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# ---- Forward process ----------------------------------------------------------------


def q_mean_variance(sched: Schedule, x0, t):
    """q(x_t|x_0) = N(√ᾱ_t x_0, (1-ᾱ_t) I) (eq. 4): mean, variance, log variance."""
    mean = _at(sched.sqrt_alphas_cumprod, t, x0) * x0
    variance = jnp.square(_at(sched.sqrt_one_minus_alphas_cumprod, t, x0))
    log_variance = _at(sched.log_one_minus_alphas_cumprod, t, x0)
    return mean, variance, log_variance


def q_sample(sched: Schedule, x0, t, eps):
    """x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε, a draw from q(x_t|x_0) (eq. 4) given ε ~ N(0, I)."""
    return _at(sched.sqrt_alphas_cumprod, t, x0) * x0 + (
        _at(sched.sqrt_one_minus_alphas_cumprod, t, x0) * eps
    )


def q_posterior_mean_variance(sched: Schedule, x0, x_t, t):
    """q(x_{t-1}|x_t,x_0) = N(μ̃_t, β̃_t I) (eq. 6-7): mean, variance, clipped log variance."""
    mean = _at(sched.posterior_mean_coef1, t, x_t) * x0 + (
        _at(sched.posterior_mean_coef2, t, x_t) * x_t
    )
    variance = _at(sched.posterior_variance, t, x_t)
    log_variance = _at(sched.posterior_log_variance_clipped, t, x_t)
    return mean, variance, log_variance


# ---- Reverse process ----------------------------------------------------------------


def predict_x0_from_eps(sched: Schedule, x_t, t, eps):
    """x̂_0 = (x_t - √(1-ᾱ_t) ε) / √ᾱ_t, eq. 4 solved for x_0 (the form used in eq. 15)."""
    return _at(sched.sqrt_recip_alphas_cumprod, t, x_t) * x_t - (
        _at(sched.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
    )


def predict_eps_from_x0(sched: Schedule, x_t, t, x0):
    """ε̂ = (x_t/√ᾱ_t - x̂_0) / √(1/ᾱ_t - 1), eq. 4 solved for ε."""
    return (_at(sched.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / _at(
        sched.sqrt_recipm1_alphas_cumprod, t, x_t
    )


def predict_x0_from_xprev(sched: Schedule, x_t, t, xprev):
    """x̂_0 from a predicted mean x_{t-1} = μ̃_t: eq. 7 solved for x_0."""
    coef1 = _at(sched.posterior_mean_coef1, t, x_t)
    coef2 = _at(sched.posterior_mean_coef2, t, x_t)
    return (xprev - coef2 * x_t) / coef1


def model_variance(sched: Schedule, x_t, t, var_type):
    """Σ_θ = σ²_t I (§3.2): 'fixedsmall' σ² = β̃_t, 'fixedlarge' σ² = β_t; (var, log var).

    At t=0 the log variance is log β̃ of the first nonzero entry for both types (the
    discretized decoder needs a finite scale; the variance itself is unused there).
    """
    check_choice("var_type", var_type, VAR_TYPES)
    if var_type == "fixedsmall":
        return _at(sched.posterior_variance, t, x_t), _at(
            sched.posterior_log_variance_clipped, t, x_t
        )
    return _at(sched.betas, t, x_t), _at(sched.large_log_variance, t, x_t)


def p_mean_variance(sched: Schedule, model_output, x_t, t, mean_type, var_type, clip_x0=True):
    """p_θ(x_{t-1}|x_t) = N(μ_θ, σ²_t I) from the network output (eq. 1, 11): dict of
    mean, variance, log_variance and the implied x̂_0 (clipped to [-1, 1] if clip_x0)."""
    check_choice("mean_type", mean_type, MEAN_TYPES)
    variance, log_variance = model_variance(sched, x_t, t, var_type)
    clip = (lambda x: jnp.clip(x, -1.0, 1.0)) if clip_x0 else (lambda x: x)
    if mean_type == "xprev":
        mean = model_output
        x0_pred = clip(predict_x0_from_xprev(sched, x_t, t, model_output))
    else:
        if mean_type == "eps":
            x0_pred = clip(predict_x0_from_eps(sched, x_t, t, model_output))
        else:
            x0_pred = clip(model_output)
        mean, _, _ = q_posterior_mean_variance(sched, x0_pred, x_t, t)
    return dict(mean=mean, variance=variance, log_variance=log_variance, x0_pred=x0_pred)


def p_sample(sched: Schedule, model_output, x_t, t, noise, mean_type, var_type, clip_x0=True):
    """One ancestral step x_{t-1} = μ_θ + σ_t z (Algorithm 2, line 4); no noise at t=0."""
    out = p_mean_variance(sched, model_output, x_t, t, mean_type, var_type, clip_x0)
    nonzero = (t != 0).astype(x_t.dtype).reshape((t.shape[0],) + (1,) * (x_t.ndim - 1))
    return out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise


# ---- Likelihood terms -----------------------------------------------------------------


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats (for eq. 5).

    Written with expm1 so that nearly equal variances (e.g. the prior term) keep precision.
    """
    return 0.5 * (
        logvar2
        - logvar1
        + jnp.expm1(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """Φ(x) ≈ ½(1 + tanh(√(2/π)(x + 0.044715 x³))), the approximation the authors use."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
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


def prior_bpd(sched: Schedule, x0):
    """L_T = KL(q(x_T|x_0) || N(0, I)) in bits/dim per example (eq. 5)."""
    t = jnp.full((x0.shape[0],), sched.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_variance = q_mean_variance(sched, x0, t)
    kl = normal_kl(mean, log_variance, jnp.zeros_like(mean), jnp.zeros_like(log_variance))
    return mean_flat(kl) / math.log(2.0)


def vb_terms_bpd(sched: Schedule, model_output, x0, x_t, t, mean_type, var_type, clip_x0=True):
    """L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p_θ(x_{t-1}|x_t)) for t>0 and the decoder
    L_0 = -log p_θ(x_0|x_1) at t=0 (eq. 5, 13), in bits/dim per example; also x̂_0."""
    true_mean, _, true_log_variance = q_posterior_mean_variance(sched, x0, x_t, t)
    out = p_mean_variance(sched, model_output, x_t, t, mean_type, var_type, clip_x0)
    kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
    kl = mean_flat(kl) / math.log(2.0)
    log_px0 = discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
    decoder_nll = -mean_flat(log_px0) / math.log(2.0)
    return jnp.where(t == 0, decoder_nll, kl), out["x0_pred"]


# ---- Training losses --------------------------------------------------------------------


def l_simple(model_output, target):
    """L_simple = ‖target - model output‖² averaged per example (eq. 14 with target ε)."""
    return mean_flat(jnp.square(target - model_output))


def training_losses(sched: Schedule, model_output, x0, x_t, t, eps, loss_type, mean_type, var_type):
    """Per-example training loss: 'mse' is L_simple (eq. 14) against the target of the mean
    type (ε, x_0 or μ̃_t), 'kl' is the true bound term L_{t-1} (eq. 5) in bits/dim."""
    check_choice("loss_type", loss_type, LOSS_TYPES)
    check_choice("mean_type", mean_type, MEAN_TYPES)
    if loss_type == "kl":
        return vb_terms_bpd(sched, model_output, x0, x_t, t, mean_type, var_type, False)[0]
    if mean_type == "eps":
        target = eps
    elif mean_type == "x0":
        target = x0
    else:
        target = q_posterior_mean_variance(sched, x0, x_t, t)[0]
    return l_simple(model_output, target)


# ---- The full variational bound ---------------------------------------------------------


def _step_noise(rng, t, x0):
    """ε ~ N(0, I) for step t from fold_in(rng, t), or per example from fold_in(key_i, t)."""
    typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
    if rng.ndim == (1 if typed else 2):
        noise = lambda k: jax.random.normal(jax.random.fold_in(k, t), x0.shape[1:], x0.dtype)
        return jax.vmap(noise)(rng)
    return jax.random.normal(jax.random.fold_in(rng, t), x0.shape, x0.dtype)


def bpd_loop(sched: Schedule, model_fn, x0, rng, mean_type, var_type, clip_x0=True):
    """The whole bound L = L_T + Σ_{t=1}^T L_{t-1} (eq. 5) in bits/dim, by `lax.scan` over t.

    model_fn(x_t, t) -> network output. rng is one key, or one key per example (then
    example i's ε depends on its key alone, not on the batch it is in). Returns per-example
    `total_bpd` and `prior_bpd` (B,), and per-step `terms_bpd`, `x0_mse`, `eps_mse` (B, T)
    indexed by 0-based t; the ε of `eps_mse` is the one implied by x̂_0. Memory does not
    grow with T beyond these tables.
    """
    batch = x0.shape[0]

    def step(_, t):
        t_b = jnp.full((batch,), t, dtype=jnp.int32)
        eps = _step_noise(rng, t, x0)
        x_t = q_sample(sched, x0, t_b, eps)
        vb, x0_pred = vb_terms_bpd(
            sched, model_fn(x_t, t_b), x0, x_t, t_b, mean_type, var_type, clip_x0
        )
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


def ddim_step(sched: Schedule, model_output, x_t, t, noise, eta, mean_type, clip_x0=True):
    """One DDIM step (Song et al. 2021, eq. 12): x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1-ᾱ_{t-1}-σ²) ε̂
    + σ z with σ = η √((1-ᾱ_{t-1})/(1-ᾱ_t)) √(1-ᾱ_t/ᾱ_{t-1}); η=1 is ancestral sampling
    with σ² = β̃ (given a consistent ε̂), η=0 is deterministic. Returns (x_{t-1}, x̂_0)."""
    out = p_mean_variance(sched, model_output, x_t, t, mean_type, "fixedsmall", clip_x0)
    x0_pred = out["x0_pred"]
    eps = predict_eps_from_x0(sched, x_t, t, x0_pred)
    ab, ab_prev = _at(sched.alphas_cumprod, t, x_t), _at(sched.alphas_cumprod_prev, t, x_t)
    sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    mean = jnp.sqrt(ab_prev) * x0_pred + jnp.sqrt(jnp.maximum(1 - ab_prev - sigma**2, 0.0)) * eps
    nonzero = (t != 0).astype(x_t.dtype).reshape((t.shape[0],) + (1,) * (x_t.ndim - 1))
    return mean + nonzero * sigma * noise, x0_pred
