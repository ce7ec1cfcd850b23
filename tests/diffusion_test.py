"""diffusion.py against plain float64 NumPy restatements of the paper's equations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ddpm_jax import diffusion as D
from ddpm_jax import schedules

T = 1000
LN2 = math.log(2.0)


def np_tables():
    """ᾱ_t, ᾱ_{t-1}, β_t as float64 NumPy, written out from eq. 4."""
    betas = np.linspace(1e-4, 0.02, T)
    ab = np.cumprod(1 - betas)
    return betas, ab, np.append(1.0, ab[:-1])


def bcast(v, t):
    return v[t][:, None, None, None]


def np_posterior(x0, x_t, t):
    """μ̃_t and β̃_t exactly as printed in eq. 7."""
    betas, ab, ab_prev = (bcast(v, t) for v in np_tables())
    mean = (
        np.sqrt(ab_prev) * betas / (1 - ab) * x0
        + np.sqrt(1 - betas) * (1 - ab_prev) / (1 - ab) * x_t
    )
    return mean, (1 - ab_prev) / (1 - ab) * betas


def np_kl(m1, v1, m2, v2):
    """KL between univariate normals: log(s2/s1) + (s1² + (m1 - m2)²) / (2 s2²) - 1/2."""
    return 0.5 * np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x0 = rng.integers(0, 256, size=(6, 4, 4, 3)) / 127.5 - 1
    eps = rng.standard_normal(x0.shape)
    t = np.array([0, 1, 2, 250, 998, 999])
    return x0, eps, t


def S(mean_type, var_type, clip_x0=True, loss="mse"):
    return D.DiffusionSpec(mean_type, var_type, loss, clip_x0)


def as_jax(*arrays):
    return [jnp.asarray(a) for a in arrays]


def test_q_sample_and_q_mean_variance(data, precision):
    x0, eps, t = data
    sched = schedules.make_schedule("linear")
    _, ab, _ = np_tables()
    want = np.sqrt(bcast(ab, t)) * x0 + np.sqrt(1 - bcast(ab, t)) * eps
    np.testing.assert_allclose(
        D.q_sample(sched, *as_jax(x0, t, eps)), want, rtol=precision, atol=precision
    )
    mean, var, logvar = D.q_mean_variance(sched, *as_jax(x0, t))
    np.testing.assert_allclose(mean, np.sqrt(bcast(ab, t)) * x0, rtol=precision, atol=1e-12)
    np.testing.assert_allclose(var[:, 0, 0, 0], 1 - ab[t], rtol=precision)
    np.testing.assert_allclose(logvar[:, 0, 0, 0], np.log(1 - ab[t]), rtol=precision)


def test_x0_recovered_from_q_sample(data, precision):
    x0, eps, t = as_jax(*data)
    sched = schedules.make_schedule("linear")
    x_t = D.q_sample(sched, x0, t, eps)
    # At t = T-1, 1/√ᾱ ≈ 157 amplifies rounding of x_t: allow for that in float32.
    atol = 1e-9 if jax.config.jax_enable_x64 else 2e-4
    np.testing.assert_allclose(D.predict_x0_from_eps(sched, x_t, t, eps), x0, atol=atol)
    np.testing.assert_allclose(D.predict_eps_from_x0(sched, x_t, t, x0)[1:], eps[1:], atol=atol)


def test_posterior_matches_eq7(data, precision):
    x0, eps, t = data
    sched = schedules.make_schedule("linear")
    _, ab, _ = np_tables()
    x_t = np.sqrt(bcast(ab, t)) * x0 + np.sqrt(1 - bcast(ab, t)) * eps
    mean, var, logvar = D.q_posterior_mean_variance(sched, *as_jax(x0, x_t, t))
    want_mean, want_var = np_posterior(x0, x_t, t)
    np.testing.assert_allclose(mean, want_mean, rtol=precision, atol=precision)
    np.testing.assert_allclose(var, np.broadcast_to(want_var, var.shape), rtol=precision)
    # log β̃ at t=0 is clipped to log β̃ at t=1 (β̃ at t=0 is exactly 0).
    want_logvar = np.log(np_posterior(x0, x_t, np.maximum(t, 1))[1][:, 0, 0, 0])
    np.testing.assert_allclose(logvar[:, 0, 0, 0], want_logvar, rtol=precision)


def test_eps_parameterisation_gives_eq11_mean(data, precision):
    """μ_θ from ε (eq. 11) equals μ̃(x_t, x̂_0(x_t, ε)) (eq. 10) and, with the true ε, μ̃(x_t, x_0)."""
    x0, eps, t = data
    sched = schedules.make_schedule("linear")
    betas, ab, _ = np_tables()
    x_t = np.sqrt(bcast(ab, t)) * x0 + np.sqrt(1 - bcast(ab, t)) * eps
    eq11 = (x_t - bcast(betas, t) / np.sqrt(1 - bcast(ab, t)) * eps) / np.sqrt(1 - bcast(betas, t))
    out = D.p_mean_variance(sched, S("eps", "fixedlarge", False), *as_jax(eps, x_t, t))
    np.testing.assert_allclose(
        out["mean"], eq11, rtol=1e-4 if precision > 1e-6 else 1e-9, atol=1e-5
    )
    np.testing.assert_allclose(out["mean"], np_posterior(x0, x_t, t)[0], atol=2e-4)


@pytest.mark.parametrize("mean_type", D.MEAN_TYPES)
def test_mean_types_agree_on_the_true_answer(data, mean_type):
    """Each parameterisation, given its exact target, yields the same μ and x̂_0 = x_0."""
    x0, eps, t = as_jax(*data)
    sched = schedules.make_schedule("linear")
    x_t = D.q_sample(sched, x0, t, eps)
    target = {"eps": eps, "x0": x0, "xprev": D.q_posterior_mean_variance(sched, x0, x_t, t)[0]}
    target["v"] = D.v_target(sched, x0, t, eps)
    out = D.p_mean_variance(sched, S(mean_type, "fixedsmall", False), target[mean_type], x_t, t)
    want_mean = D.q_posterior_mean_variance(sched, x0, x_t, t)[0]
    np.testing.assert_allclose(out["mean"], want_mean, atol=1e-4)
    np.testing.assert_allclose(out["x0_pred"][:-1], x0[:-1], atol=2e-3)


def test_clipping_of_x0(data):
    x0, eps, t = as_jax(*data)
    sched = schedules.make_schedule("linear")
    out = D.p_mean_variance(sched, S("x0", "fixedsmall", True), 3 * x0, x0, t)
    np.testing.assert_allclose(out["x0_pred"], jnp.clip(3 * x0, -1, 1))
    assert float(jnp.max(jnp.abs(out["x0_pred"]))) <= 1.0


def test_variance_types(data, precision):
    x0, _, t = data
    sched = schedules.make_schedule("linear")
    betas, ab, ab_prev = np_tables()
    beta_tilde = (1 - ab_prev) / (1 - ab) * betas
    small = D.model_variance(sched, S("eps", "fixedsmall"), jnp.asarray(x0), jnp.asarray(t))
    large = D.model_variance(sched, S("eps", "fixedlarge"), jnp.asarray(x0), jnp.asarray(t))
    np.testing.assert_allclose(small[0][:, 0, 0, 0], beta_tilde[t], rtol=precision)
    np.testing.assert_allclose(large[0][:, 0, 0, 0], betas[t], rtol=precision)
    np.testing.assert_allclose(large[1][1:, 0, 0, 0], np.log(betas[t[1:]]), rtol=precision)
    # t=0: both use log β̃ of the first nonzero entry (the decoder's scale).
    for _, logvar in (small, large):
        np.testing.assert_allclose(logvar[0, 0, 0, 0], np.log(beta_tilde[1]), rtol=precision)


def test_p_sample_is_algorithm2_step(data, precision):
    x0, eps, t = data
    noise = np.random.default_rng(1).standard_normal(x0.shape)
    sched = schedules.make_schedule("linear")
    betas, ab, _ = np_tables()
    x_t = np.sqrt(bcast(ab, t)) * x0 + np.sqrt(1 - bcast(ab, t)) * eps
    got = D.p_sample(sched, S("eps", "fixedlarge", False), *as_jax(eps, x_t, t, noise))
    # Algorithm 2 line 4 with σ_t² = β_t, and z = 0 at the last step (t=0 here).
    mean = (x_t - bcast(betas, t) / np.sqrt(1 - bcast(ab, t)) * eps) / np.sqrt(1 - bcast(betas, t))
    want = mean + (t > 0)[:, None, None, None] * np.sqrt(bcast(betas, t)) * noise
    np.testing.assert_allclose(got, want, rtol=1e-4 if precision > 1e-6 else 1e-9, atol=1e-5)


def test_normal_kl():
    rng = np.random.default_rng(2)
    m1, m2 = rng.standard_normal((2, 1000))
    lv1, lv2 = rng.uniform(-5, 2, size=(2, 1000))
    got = np.asarray(D.normal_kl(*as_jax(m1, lv1, m2, lv2)))
    np.testing.assert_allclose(got, np_kl(m1, np.exp(lv1), m2, np.exp(lv2)), rtol=1e-4, atol=1e-6)
    assert got.min() >= 0
    assert float(jnp.max(jnp.abs(D.normal_kl(*as_jax(m1, lv1, m1, lv1))))) == 0.0


def test_approx_normal_cdf_is_close_to_exact():
    x = np.linspace(-6, 6, 2001)
    got = np.asarray(D.approx_standard_normal_cdf(jnp.asarray(x)))
    assert np.max(np.abs(got - stats.norm.cdf(x))) < 2e-4


def np_discretized_log_likelihood(x, mean, log_scale):
    """Eq. 13 written out: the bin [x - 1/255, x + 1/255], the edge bins open to ±∞."""
    cdf = lambda v: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))
    s = np.exp(log_scale)
    upper = np.where(x > 0.999, 1.0, cdf((x + 1 / 255 - mean) / s))
    lower = np.where(x < -0.999, 0.0, cdf((x - 1 / 255 - mean) / s))
    return np.log(np.maximum(upper - lower, 1e-12))


@pytest.mark.parametrize("x64", [False, True])
def test_discretized_decoder(x64):
    k = np.arange(256)
    x = (k / 127.5 - 1)[None, :]
    rng = np.random.default_rng(3)
    mean = rng.uniform(-1.2, 1.2, size=(64, 1))
    log_scale = rng.uniform(np.log(1e-3), np.log(0.5), size=(64, 1))
    with jax.enable_x64(x64):
        logp = np.asarray(D.discretized_gaussian_log_likelihood(*as_jax(x, mean, log_scale)))
    want = np_discretized_log_likelihood(x, mean, log_scale)
    # A difference of two CDFs near 1 is exact to machine precision in probability (float32
    # also rounds x - mean, scaled by up to 1/σ = 1000), so
    # compare probabilities everywhere and log-probabilities where the bin is not tiny.
    np.testing.assert_allclose(np.exp(logp), np.exp(want), atol=1e-12 if x64 else 1e-5)
    big = want > np.log(1e-3)
    np.testing.assert_allclose(logp[big], want[big], rtol=1e-9 if x64 else 1e-4)
    # The 256 bins are a partition of the real line: their probabilities sum to 1.
    np.testing.assert_allclose(np.exp(logp.astype(np.float64)).sum(axis=1), 1.0, atol=1e-5)


def test_prior_term_of_the_paper_schedule():
    """L_T ≈ 1e-5 bits/dim for the linear T=1000 schedule (§4), and its closed form."""
    sched = schedules.make_schedule("linear")
    x0 = np.random.default_rng(4).integers(0, 256, size=(16, 8, 8, 3)) / 127.5 - 1
    got = np.asarray(D.prior_bpd(sched, jnp.asarray(x0)))
    ab_T = np_tables()[1][-1]
    want = np.mean(np_kl(np.sqrt(ab_T) * x0, 1 - ab_T, 0.0, 1.0), axis=(1, 2, 3)) / LN2
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert np.all(got > 0) and np.all(got < 1.5e-5)


@pytest.mark.parametrize("mean_type", D.MEAN_TYPES)
@pytest.mark.parametrize("var_type", ["fixedsmall"])
def test_true_posterior_model_has_zero_kl(data, mean_type, var_type):
    """A network that outputs the true posterior leaves L_{t-1} = 0 for every t > 0."""
    x0, eps, t = as_jax(*data)
    sched = schedules.make_schedule("linear")
    x_t = D.q_sample(sched, x0, t, eps)
    mean_true = D.q_posterior_mean_variance(sched, x0, x_t, t)[0]
    target = {"eps": eps, "x0": x0, "xprev": mean_true, "v": D.v_target(sched, x0, t, eps)}
    vb, _ = D.vb_terms_bpd(sched, S(mean_type, var_type, False), target[mean_type], x0, x_t, t)
    np.testing.assert_allclose(vb[1:], 0.0, atol=2e-5)


def test_decoder_term_at_t0(data):
    x0, eps, t = data
    sched = schedules.make_schedule("linear")
    x0, eps = x0[:2], eps[:2]
    t0 = np.zeros(2, dtype=np.int32)
    _, ab, _ = np_tables()
    x_1 = np.sqrt(ab[0]) * x0 + np.sqrt(1 - ab[0]) * eps
    model_out = 0.3 * eps  # a poor ε-prediction, so the decoder term is far from 0
    vb, x0_pred = D.vb_terms_bpd(
        sched, S("eps", "fixedlarge", False), *as_jax(model_out, x0, x_1, t0)
    )
    betas = np_tables()[0]
    mean = (x_1 - betas[0] / np.sqrt(1 - ab[0]) * model_out) / np.sqrt(1 - betas[0])
    beta_tilde_1 = (1 - ab[0]) / (1 - ab[1]) * betas[1]
    want = (
        -np_discretized_log_likelihood(x0, mean, 0.5 * np.log(beta_tilde_1)).mean(axis=(1, 2, 3))
        / LN2
    )
    np.testing.assert_allclose(vb, want, rtol=1e-4)


def test_training_losses(data):
    x0, eps, t = as_jax(*data)
    sched = schedules.make_schedule("linear")
    x_t = D.q_sample(sched, x0, t, eps)
    out = 0.5 * eps
    mse = D.training_losses(sched, S("eps", "fixedlarge"), out, x0, x_t, t, eps)
    np.testing.assert_allclose(
        mse, np.mean((0.5 * np.asarray(eps)) ** 2, axis=(1, 2, 3)), rtol=1e-6
    )
    mse_x0 = D.training_losses(sched, S("x0", "fixedlarge"), out, x0, x_t, t, eps)
    np.testing.assert_allclose(
        mse_x0, np.mean((np.asarray(out - x0)) ** 2, axis=(1, 2, 3)), rtol=1e-6
    )
    kl = D.training_losses(sched, S("eps", "fixedlarge", loss="kl"), out, x0, x_t, t, eps)
    np.testing.assert_allclose(
        kl, D.vb_terms_bpd(sched, S("eps", "fixedlarge", False), out, x0, x_t, t)[0]
    )


def exact_gaussian_eps(sched):
    """For x_0 ~ N(0, I): E[ε | x_t] = √(1-ᾱ_t) x_t, the optimal ε-predictor in closed form."""
    return lambda x_t, t: D._at(sched.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t


def test_bound_with_exact_predictor_for_gaussian_data():
    """Each E[L_{t-1}] (t > 0) and E[L_T] match their closed forms for x_0 ~ N(0, I)."""
    sched = schedules.make_schedule("linear")
    x0 = jax.random.normal(jax.random.key(0), (256, 4, 4, 2))
    out = jax.jit(
        lambda x0, rng: D.bpd_loop(
            sched, S("eps", "fixedlarge", False), exact_gaussian_eps(sched), x0, rng
        )
    )(x0, jax.random.key(1))
    betas, ab, ab_prev = (v[1:] for v in np_tables())  # t > 0: the KL terms
    beta_tilde = (1 - ab_prev) / (1 - ab) * betas
    coef1 = np.sqrt(ab_prev) * betas / (1 - ab)
    # E over (x_0, x_t) of eq. 5's KL: E[(x_0 - x̂_0)²] = Var(x_0 | x_t) = 1 - ᾱ_t.
    want = 0.5 * (np.log(betas / beta_tilde) - 1 + beta_tilde / betas + coef1**2 * (1 - ab) / betas)
    terms = np.asarray(out["terms_bpd"], np.float64)[:, 1:]
    se = terms.std(axis=0) / np.sqrt(terms.shape[0])
    z = (terms.mean(axis=0) - want / LN2) / se
    assert np.mean(np.abs(z) < 4) > 0.99, np.sort(np.abs(z))[-10:]
    # Summed over t the continuous part of the bound matches to ~1%.
    np.testing.assert_allclose(terms.sum(1).mean(), want.sum() / LN2, rtol=0.01)
    prior = np.asarray(out["prior_bpd"]).mean()
    np.testing.assert_allclose(prior, -0.5 * np.log(1 - ab[-1]) / LN2, rtol=0.05)
    assert np.all(np.isfinite(np.asarray(out["total_bpd"])))
    np.testing.assert_allclose(out["x0_mse"].mean(0)[1:], 1 - ab, rtol=0.1)


def test_bound_loop_equals_plain_loop():
    """The scan equals a Python loop over t of q_sample + vb_terms_bpd with the same noise."""
    sched = schedules.make_schedule("linear", num_timesteps=12, beta_end=0.2)
    x0 = (
        jnp.round(jax.random.uniform(jax.random.key(2), (3, 4, 4, 1), minval=-1, maxval=1) * 127.5)
        / 127.5
    )
    model = lambda x_t, t: 0.9 * x_t + 0.01 * t[:, None, None, None]
    rng = jax.random.key(3)
    got = D.bpd_loop(sched, S("eps", "fixedsmall", True), model, x0, rng)
    for t in range(12):
        t_b = jnp.full((3,), t)
        eps = jax.random.normal(jax.random.fold_in(rng, t), x0.shape)
        x_t = D.q_sample(sched, x0, t_b, eps)
        vb, x0_pred = D.vb_terms_bpd(
            sched, S("eps", "fixedsmall", True), model(x_t, t_b), x0, x_t, t_b
        )
        np.testing.assert_allclose(got["terms_bpd"][:, t], vb, rtol=1e-5)
        np.testing.assert_allclose(got["x0_mse"][:, t], D.l_simple(x0_pred, x0), rtol=1e-5)
    total = got["terms_bpd"].sum(1) + D.prior_bpd(sched, x0)
    np.testing.assert_allclose(got["total_bpd"], total, rtol=1e-6)
    assert np.all(np.asarray(got["terms_bpd"]) >= 0) and got["eps_mse"].shape == (3, 12)


def test_vmap_over_examples_equals_batch(data):
    x0, eps, t = as_jax(*data)
    sched = schedules.make_schedule("linear")
    one = lambda x0, eps, t: D.q_sample(sched, x0[None], t[None], eps[None])[0]
    np.testing.assert_allclose(jax.vmap(one)(x0, eps, t), D.q_sample(sched, x0, t, eps), rtol=1e-6)


@pytest.mark.parametrize(
    "call, word",
    [
        (lambda s, a, t: D.p_mean_variance(s, S("score", "fixedsmall"), a, a, t), "mean_type"),
        (lambda s, a, t: D.p_mean_variance(s, S("eps", "learned"), a, a, t), "var_type"),
        (
            lambda s, a, t: D.training_losses(
                s, S("eps", "fixedsmall", loss="huber"), a, a, a, t, a
            ),
            "loss_type",
        ),
    ],
)
def test_bad_types_name_the_argument(call, word):
    sched = schedules.make_schedule("linear", num_timesteps=10)
    with pytest.raises(ValueError, match=word):
        call(sched, jnp.zeros((2, 4, 4, 1)), jnp.zeros((2,), jnp.int32))
