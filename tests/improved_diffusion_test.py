"""After the paper: learned variances, the hybrid loss, v-prediction and L1 (diffusion.py,
spec.py), against float64 NumPy restatements and the identities that tie them to the
paper's fixed-variance model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import config_lib, reverse, schedules
from ddpm_jax import diffusion as D
from ddpm_jax.errors import UserError
from ddpm_jax.spec import SamplerSpec

T = 1000
LN2 = math.log(2.0)


def np_tables(betas):
    """β_t, ᾱ_t, ᾱ_{t-1} and β̃_t (eq. 7) in float64, with β̃'s log clipped at t=0."""
    ab = np.cumprod(1 - betas)
    ab_prev = np.append(1.0, ab[:-1])
    beta_tilde = (1 - ab_prev) / (1 - ab) * betas
    log_beta_tilde = np.log(np.append(beta_tilde[1], beta_tilde[1:]))
    return betas, ab, ab_prev, beta_tilde, log_beta_tilde


def b(v, t):
    return v[t][:, None, None, None]


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x0 = rng.integers(0, 256, size=(6, 4, 4, 2)) / 127.5 - 1
    eps = rng.standard_normal(x0.shape)
    var_out = rng.uniform(-1, 1, size=x0.shape)
    t = np.array([0, 1, 2, 250, 998, 999])
    return x0, eps, var_out, t


def spec(mean="eps", var="learned_range", loss="hybrid", clip=False):
    return D.DiffusionSpec(mean, var, loss, clip)


def test_learned_range_is_nichol_dhariwal_eq15(data):
    _, _, var_out, t = data
    sched = schedules.make_schedule("linear")
    betas, _, _, _, log_beta_tilde = np_tables(np.linspace(1e-4, 0.02, T))
    x = jnp.zeros(var_out.shape)
    var, log_var = D.model_variance(sched, spec(), x, jnp.asarray(t), jnp.asarray(var_out))
    v = (var_out + 1) / 2
    want = v * np.log(b(betas, t)) + (1 - v) * b(log_beta_tilde, t)
    np.testing.assert_allclose(log_var, want, rtol=1e-5)
    np.testing.assert_allclose(var, np.exp(want), rtol=1e-4)


def test_learned_range_ends_are_the_fixed_variances(data):
    """v = 0 is fixed-small at every t; v = 1 is fixed-large for t >= 1 and log β_1 at t = 0
    (fixed-large's t = 0 takes log β̃_2, which v = 0 gives)."""
    t = jnp.asarray(data[3])
    sched = schedules.make_schedule("linear")
    x = jnp.zeros((t.shape[0], 1, 1, 1))
    small = D.model_variance(sched, spec(var="fixedsmall", loss="mse"), x, t)
    large = D.model_variance(sched, spec(var="fixedlarge", loss="mse"), x, t)
    lo = D.model_variance(sched, spec(), x, t, -jnp.ones_like(x))
    hi = D.model_variance(sched, spec(), x, t, jnp.ones_like(x))
    np.testing.assert_allclose(lo[1], small[1], rtol=1e-6)
    np.testing.assert_allclose(lo[0][1:], small[0][1:], rtol=1e-5)  # β̃ at t=0 is 0 itself
    np.testing.assert_allclose(hi[1][1:], large[1][1:], rtol=1e-6)
    np.testing.assert_allclose(hi[0][1:], large[0][1:], rtol=1e-5)
    np.testing.assert_allclose(hi[1][0], np.log(1e-4), rtol=1e-6)
    np.testing.assert_allclose(lo[1][0], large[1][0], rtol=1e-6)


def np_kl_learned(x0, x_t, eps_pred, var_out, t, betas):
    """L_{t-1} in bits/dim for an ε-prediction and a learned range, written out."""
    betas, ab, ab_prev, beta_tilde, log_beta_tilde = np_tables(betas)
    mu_true = (
        np.sqrt(b(ab_prev, t)) * b(betas, t) / (1 - b(ab, t)) * x0
        + np.sqrt(1 - b(betas, t)) * (1 - b(ab_prev, t)) / (1 - b(ab, t)) * x_t
    )
    mu = (x_t - b(betas, t) / np.sqrt(1 - b(ab, t)) * eps_pred) / np.sqrt(1 - b(betas, t))
    v = (var_out + 1) / 2
    log_var = v * np.log(b(betas, t)) + (1 - v) * b(log_beta_tilde, t)
    log_var_true = b(log_beta_tilde, t)
    kl = 0.5 * (
        log_var
        - log_var_true
        + np.exp(log_var_true - log_var)
        + (mu_true - mu) ** 2 / np.exp(log_var)
        - 1
    )
    return kl.mean(axis=(1, 2, 3)) / LN2


def test_hybrid_loss_is_l_simple_plus_lambda_times_the_bound(data):
    x0, eps, var_out, t = data
    t = t[1:]  # the KL terms (t = 0 is the decoder, checked by the bound's own tests)
    x0, eps, var_out = x0[1:], eps[1:], var_out[1:]
    betas = np.linspace(1e-4, 0.02, T)
    sched = schedules.make_schedule("linear")
    ab = np.cumprod(1 - betas)
    x_t = np.sqrt(b(ab, t)) * x0 + np.sqrt(1 - b(ab, t)) * eps
    eps_pred = 0.7 * eps + 0.1
    out = np.concatenate([eps_pred, var_out], axis=-1)
    got = D.training_losses(sched, spec(), *map(jnp.asarray, (out, x0, x_t, t, eps)))
    vb = np_kl_learned(x0, x_t, eps_pred, var_out, t, betas)
    want = ((eps - eps_pred) ** 2).mean(axis=(1, 2, 3)) + 0.001 * T * vb
    np.testing.assert_allclose(got, want, rtol=2e-4)
    kl = D.training_losses(sched, spec(loss="kl"), *map(jnp.asarray, (out, x0, x_t, t, eps)))
    np.testing.assert_allclose(kl, vb, rtol=2e-4)


def test_hybrid_gradient_of_the_mean_is_l_simples(data):
    """The mean is frozen in the bound term: ∂L_hybrid/∂(mean part) = ∂L_simple/∂(mean part),
    and only the bound term moves the variance part."""
    x0, eps, var_out, t = map(jnp.asarray, data)
    sched = schedules.make_schedule("linear")
    x_t = D.q_sample(sched, x0, t, eps)
    out = jnp.concatenate([0.5 * eps, var_out], axis=-1)
    hybrid = lambda o: jnp.sum(D.training_losses(sched, spec(), o, x0, x_t, t, eps))
    vb = lambda o: jnp.sum(D.vb_terms_bpd(sched, spec(loss="kl"), o, x0, x_t, t)[0])
    mse = lambda m: jnp.sum(D.l_simple(m, eps))
    g = jax.grad(hybrid)(out)
    np.testing.assert_allclose(g[..., :2], jax.grad(mse)(out[..., :2]), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(g[..., 2:], 0.001 * T * jax.grad(vb)(out)[..., 2:], rtol=1e-5)
    assert float(jnp.max(jnp.abs(g[..., 2:]))) > 0
    assert float(jnp.max(jnp.abs(jax.grad(vb)(out)[..., :2]))) > 0  # what the freezing removes


def test_v_target_and_its_inversions(data):
    """v = √ᾱ ε - √(1-ᾱ) x_0, and from the true v both x_0 and ε come back exactly."""
    x0, eps, _, t = data
    sched = schedules.make_schedule("linear")
    _, ab, _, _, _ = np_tables(np.linspace(1e-4, 0.02, T))
    want = np.sqrt(b(ab, t)) * eps - np.sqrt(1 - b(ab, t)) * x0
    with jax.enable_x64(True):
        sched = schedules.make_schedule("linear")
        x0_, eps_, t_ = map(jnp.asarray, (x0, eps, t))
        v = D.v_target(sched, x0_, t_, eps_)
        x_t = D.q_sample(sched, x0_, t_, eps_)
        x0_pred = D.predict_x0_from_v(sched, x_t, t_, v)
        eps_pred = D.predict_eps_from_x0(sched, x_t, t_, x0_pred)
        np.testing.assert_allclose(v, want, rtol=1e-12)
        np.testing.assert_allclose(x0_pred, x0, atol=1e-12)
        np.testing.assert_allclose(eps_pred, eps, atol=1e-9)
        out = D.p_mean_variance(sched, spec("v", "fixedsmall", "mse"), v, x_t, t_)
        posterior = D.q_posterior_mean_variance(sched, x0_, x_t, t_)[0]
        np.testing.assert_allclose(out["mean"], posterior, atol=1e-12)


@pytest.mark.parametrize("mean", ["eps", "x0", "v"])
def test_l1_and_mse_on_each_target(data, mean):
    x0, eps, _, t = data
    sched = schedules.make_schedule("linear")
    _, ab, _, _, _ = np_tables(np.linspace(1e-4, 0.02, T))
    x_t = np.sqrt(b(ab, t)) * x0 + np.sqrt(1 - b(ab, t)) * eps
    target = {"eps": eps, "x0": x0, "v": np.sqrt(b(ab, t)) * eps - np.sqrt(1 - b(ab, t)) * x0}
    out = 0.3 * x_t
    args = map(jnp.asarray, (out, x0, x_t, t, eps))
    l1 = D.training_losses(sched, spec(mean, "fixedlarge", "l1"), *args)
    np.testing.assert_allclose(l1, np.abs(target[mean] - out).mean(axis=(1, 2, 3)), rtol=1e-5)
    args = map(jnp.asarray, (out, x0, x_t, t, eps))
    mse = D.training_losses(sched, spec(mean, "fixedlarge", "mse"), *args)
    np.testing.assert_allclose(mse, ((target[mean] - out) ** 2).mean(axis=(1, 2, 3)), rtol=1e-5)


def test_v_chain_with_a_learned_range_against_numpy():
    """sample_loop with the noise given as an array, step by step against a float64 NumPy
    chain: v-prediction, a learned range, x̂_0 clipped."""
    betas = np.linspace(1e-4, 0.2, 8)
    sched = schedules.schedule_from_betas(betas)
    betas, ab, ab_prev, beta_tilde, log_beta_tilde = np_tables(betas)
    model = lambda x, t: jnp.concatenate([0.4 * x - 0.02 * t[:, None, None, None], jnp.tanh(x)], -1)
    rng = np.random.default_rng(5)
    x_T, zs = rng.standard_normal((3, 4, 4, 1)), rng.standard_normal((8, 3, 4, 4, 1))
    s = spec("v", "learned_range", "hybrid", clip=True)
    got = reverse.sample_loop(sched, s, model, jnp.asarray(x_T, jnp.float32), jnp.asarray(zs))
    x = x_T
    for t in reversed(range(8)):
        v = 0.4 * x - 0.02 * t
        x0 = np.clip(np.sqrt(ab[t]) * x - np.sqrt(1 - ab[t]) * v, -1, 1)
        mean = (
            np.sqrt(ab_prev[t]) * betas[t] / (1 - ab[t]) * x0
            + np.sqrt(1 - betas[t]) * (1 - ab_prev[t]) / (1 - ab[t]) * x
        )
        frac = (np.tanh(x) + 1) / 2
        log_var = frac * np.log(betas[t]) + (1 - frac) * log_beta_tilde[t]
        x = mean + (t > 0) * np.exp(0.5 * log_var) * zs[t]
    np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-5)


def test_exact_v_predictor_samples_the_data_distribution():
    """x_0 ~ N(m, s²): the exact v (from E[ε|x_t] in closed form) samples N(m, s²) with the
    ancestral chain and with DDIM."""
    m, s = 0.3, 0.5
    sched = schedules.make_schedule("linear")

    def exact_v(x_t, t):
        ab = sched.alphas_cumprod[t][:, None, None, None]
        eps = jnp.sqrt(1 - ab) * (x_t - jnp.sqrt(ab) * m) / (ab * s**2 + 1 - ab)
        x0 = (x_t - jnp.sqrt(1 - ab) * eps) / jnp.sqrt(ab)
        return jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * x0

    keys = reverse.example_keys(jax.random.key(2), 4000)
    x_T = reverse.initial_noise(keys, (2, 2, 1), 1000)
    s_v = spec("v", "fixedsmall", "mse")
    for sampler in (SamplerSpec("ancestral"), SamplerSpec("ddim", eta=0.0)):
        run = jax.jit(
            lambda x, s=sampler: reverse.sample_loop(sched, s_v, exact_v, x, keys, sampler=s)
        )
        x0 = np.asarray(run(x_T)).ravel()
        n = x0.size
        assert abs(x0.mean() - m) < 4 * s / np.sqrt(n)
        assert abs(x0.var() / s**2 - 1) < 4 * np.sqrt(2 / n) + 0.01


def test_respaced_learned_range_uses_the_respaced_betas():
    """Nichol & Dhariwal §4: Σ of a respaced chain interpolates its own β'_i and β̃'_i, from
    the original ᾱ at the kept steps; v = 0 (-1 out) is the respaced fixed-small chain."""
    sched = schedules.make_schedule("linear", num_timesteps=100, beta_end=0.05)
    model = lambda x, t: jnp.concatenate([0.3 * x, jnp.full_like(x, 0.2)], -1)
    short, short_model = reverse.respaced(sched, model, 10)
    kept = schedules.space_timesteps(100, 10)
    ab = np.cumprod(1 - np.linspace(1e-4, 0.05, 100))[kept]
    betas = 1 - ab / np.append(1.0, ab[:-1])
    betas, _, _, _, log_beta_tilde = np_tables(betas)
    t = jnp.arange(10)
    x = jnp.zeros((10, 1, 1, 1))
    _, log_var = D.model_variance(short, spec(), x, t, jnp.full_like(x, 0.2))
    want = 0.6 * np.log(betas) + 0.4 * log_beta_tilde
    np.testing.assert_allclose(log_var[:, 0, 0, 0], want, rtol=1e-5)
    keys = reverse.example_keys(jax.random.key(3), 2)
    x_T = reverse.initial_noise(keys, (4, 4, 1), 10)
    lo = lambda x, t: jnp.concatenate([0.3 * x, -jnp.ones_like(x)], -1)
    _, lo_short = reverse.respaced(sched, lo, 10)
    _, small_short = reverse.respaced(sched, lambda x, t: 0.3 * x, 10)
    got = reverse.sample_loop(short, spec(clip=True), lo_short, x_T, keys)
    want = reverse.sample_loop(
        short, spec("eps", "fixedsmall", "mse", True), small_short, x_T, keys
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_noise_as_function_array_and_keys_agree():
    """bpd_loop and sample_loop draw the same ε from keys, from a function of t, or from an
    array of the same draws."""
    sched = schedules.make_schedule("linear", num_timesteps=6, beta_end=0.3)
    keys = reverse.example_keys(jax.random.key(4), 2)
    x0 = (
        jnp.round(jax.random.uniform(jax.random.key(5), (2, 4, 4, 1), minval=-1, maxval=1) * 127.5)
        / 127.5
    )
    table = jnp.stack([D.keyed_normal(keys, t, (4, 4, 1)) for t in range(6)])
    model = lambda x, t: 0.5 * x
    s = spec("eps", "fixedsmall", "mse", True)
    by_keys = D.bpd_loop(sched, s, model, x0, keys)
    by_array = D.bpd_loop(sched, s, model, x0, table)
    by_fn = D.bpd_loop(sched, s, model, x0, lambda t: table[t])
    for other in (by_array, by_fn):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), by_keys, other)
    x_T = reverse.initial_noise(keys, (4, 4, 1), 6)
    a = reverse.sample_loop(sched, s, model, x_T, keys)
    np.testing.assert_allclose(a, reverse.sample_loop(sched, s, model, x_T, table), atol=1e-6)


def test_spec_checks_and_output_channels():
    s = D.DiffusionSpec("v", "learned_range", "hybrid")
    assert (s.mean_type, s.var_type, s.loss_type) == (D.MeanType.V, "learned_range", "hybrid")
    assert s.output_channels(3) == 6 and D.DiffusionSpec().output_channels(3) == 3
    assert hash(s) == hash(D.DiffusionSpec("v", "learned_range", "hybrid"))  # a static argument
    with pytest.raises(UserError, match="use loss_type='hybrid'"):
        D.DiffusionSpec(var_type="learned_range", loss_type="l1")
    with pytest.raises(UserError, match="set var_type='learned_range'"):
        D.DiffusionSpec(loss_type="hybrid")


def test_learned_range_doubles_only_the_output_channels():
    """unet_config's out_ch follows the spec; the paper's configs keep exactly their counts."""
    cifar = config_lib.load_config("cifar")
    assert config_lib.unet_config(cifar).out_ch == 3
    cifar.diffusion.update(var_type="learned_range", loss_type="hybrid")
    assert config_lib.unet_config(cifar).out_ch == 6
    improved = config_lib.load_config("cifar_improved")
    assert config_lib.unet_config(improved).out_ch == 6
    assert config_lib.diffusion_spec(improved) == D.DiffusionSpec("eps", "learned_range", "hybrid")
