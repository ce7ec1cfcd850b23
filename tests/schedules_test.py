"""Schedules and their tables against plain float64 restatements of the paper's formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import schedules


def reference_betas(name, T, b0=1e-4, b1=0.02):
    """Each β_t written out element by element."""
    if name == "linear":
        return [b0 + (b1 - b0) * i / (T - 1) for i in range(T)]
    if name in ("quad", "scaled_linear"):  # the same: LDM and diffusers name it scaled_linear
        return [
            (math.sqrt(b0) + (math.sqrt(b1) - math.sqrt(b0)) * i / (T - 1)) ** 2 for i in range(T)
        ]
    if name == "const":
        return [b1] * T
    if name == "jsd":
        return [1.0 / (T - i) for i in range(T)]
    if name.startswith("warmup"):
        w = int(T * int(name[6:]) / 100)
        return [b0 + (b1 - b0) * i / (w - 1) if i < w else b1 for i in range(T)]
    if name == "cosine":

        def f(u):
            return math.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2

        return [min(1 - f(i + 1) / f(i), 0.999) for i in range(T)]
    raise AssertionError(name)


def reference_tables(betas):
    """ᾱ by an explicit running product; β̃ and μ̃'s coefficients from eq. 7 as printed."""
    out = {k: [] for k in ("ab", "ab_prev", "post_var", "coef1", "coef2")}
    ab = 1.0
    for beta in betas:
        ab_prev, ab = ab, ab * (1 - beta)
        out["ab"].append(ab)
        out["ab_prev"].append(ab_prev)
        out["post_var"].append((1 - ab_prev) / (1 - ab) * beta)
        out["coef1"].append(math.sqrt(ab_prev) * beta / (1 - ab))
        out["coef2"].append(math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab))
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("name", schedules.SCHEDULES)
def test_betas_match_restatement(name):
    T = 1000 if name != "jsd" else 50
    got = schedules.get_beta_schedule(name, num_timesteps=T)
    np.testing.assert_allclose(got, reference_betas(name, T), rtol=1e-12)
    assert got.dtype == np.float64 and got.shape == (T,)


def test_paper_linear_schedule_endpoints():
    betas = schedules.get_beta_schedule("linear")
    assert betas[0] == 1e-4 and betas[-1] == 0.02 and betas.size == 1000
    # ᾱ_T of the paper's schedule: the signal left at the end is tiny (§4, L_T ≈ 1e-5 bits/dim).
    assert 4.0e-5 < np.prod(1 - betas) < 4.1e-5


@pytest.mark.parametrize("name", ["linear", "cosine", "quad"])
def test_tables_match_restatement(name, precision):
    betas = reference_betas(name, 1000)
    ref = reference_tables(betas)
    s = schedules.make_schedule(name, num_timesteps=1000)
    want_dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    assert s.alphas_cumprod.dtype == want_dtype
    check = lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=precision, atol=0)
    check(s.betas, betas)
    check(s.alphas_cumprod, ref["ab"])
    check(s.alphas_cumprod_prev, ref["ab_prev"])
    check(s.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - ref["ab"]))
    check(s.sqrt_recip_alphas_cumprod, 1 / np.sqrt(ref["ab"]))
    check(s.sqrt_recipm1_alphas_cumprod, np.sqrt(1 / ref["ab"] - 1))
    check(s.posterior_variance, ref["post_var"])
    check(s.posterior_mean_coef1, ref["coef1"])
    check(s.posterior_mean_coef2, ref["coef2"])
    # log β̃ clipped at t=0 to the first nonzero entry; log σ² = log β for 'fixed large'.
    check(s.posterior_log_variance_clipped[1:], np.log(ref["post_var"][1:]))
    check(s.posterior_log_variance_clipped[0], np.log(ref["post_var"][1]))
    check(s.large_log_variance[1:], np.log(betas[1:]))
    check(s.large_log_variance[0], np.log(ref["post_var"][1]))
    assert ref["post_var"][0] == 0.0


def test_tables_built_in_float64_then_cast():
    """Each float32 entry is the float64 value rounded once, not the result of float32 math."""
    s = schedules.make_schedule("linear")
    ref = reference_tables(reference_betas("linear", 1000))
    np.testing.assert_array_equal(np.asarray(s.alphas_cumprod), ref["ab"].astype(np.float32))
    np.testing.assert_array_equal(
        np.asarray(s.posterior_variance), ref["post_var"].astype(np.float32)
    )
    # The same product accumulated in float32 drifts far more (~1.7e-4 in 1 - ᾱ).
    ab32 = np.cumprod(1 - np.asarray(reference_betas("linear", 1000), np.float32))
    # 1 - ᾱ, which q(x_t|x_0) needs, comes from its own table at float32 precision.
    one_minus = np.asarray(s.sqrt_one_minus_alphas_cumprod, np.float64) ** 2
    rel = lambda x: np.max(np.abs(x - (1 - ref["ab"])) / (1 - ref["ab"]))
    assert rel(one_minus) < 3e-7 and rel(1 - ab32) > 1e-4


def test_schedule_is_a_pytree():
    s = schedules.make_schedule("linear", num_timesteps=10)
    leaves = jax.tree.leaves(s)
    assert len(leaves) == 13 and all(leaf.shape == (10,) for leaf in leaves)
    doubled = jax.jit(lambda s: jax.tree.map(lambda a: 2 * a, s))(s)
    assert isinstance(doubled, schedules.Schedule) and doubled.num_timesteps == 10
    np.testing.assert_allclose(doubled.betas, 2 * np.asarray(s.betas))


def test_single_step_schedule():
    s = schedules.make_schedule("linear", num_timesteps=1, beta_start=0.02)
    assert s.num_timesteps == 1 and np.isfinite(np.asarray(s.posterior_log_variance_clipped)).all()


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(name="linear", num_timesteps=0), "num_timesteps"),
        (dict(name="linear", num_timesteps=2.5), "num_timesteps"),
        (dict(name="linear", beta_start=0.0), "betas"),
        (dict(name="linear", beta_end=1.5), "betas"),
        (dict(name="const", beta_end=-0.1), "betas"),
        (dict(name="sigmoid"), "schedule"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, word):
    with pytest.raises(ValueError, match=word):
        schedules.make_schedule(**kwargs)


@pytest.mark.parametrize("betas", [[0.1, 0.0], [[0.1]], [], [0.5, 1.2]])
def test_schedule_from_bad_betas(betas):
    with pytest.raises(ValueError, match="betas"):
        schedules.schedule_from_betas(np.asarray(betas))
