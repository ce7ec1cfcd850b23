"""The importance sampler of timesteps (timesteps.py): its history against a plain loop, its
probabilities against their formula, and the unbiasedness of the weighted bound."""

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, reverse, schedules, timesteps


def loop_update(losses, counts, t, values, size):
    """The history update written as a loop over the batch, in order."""
    losses, counts = losses.copy(), counts.copy()
    for ti, v in zip(t, values, strict=True):
        losses[ti] = np.append(losses[ti][1:], v)
        counts[ti] = min(counts[ti] + 1, size)
    return losses, counts


def test_update_equals_a_loop_over_the_batch():
    rng = np.random.default_rng(0)
    history = timesteps.init_history(7, size=3)
    losses, counts = np.zeros((7, 3), np.float32), np.zeros(7, np.int32)
    update = jax.jit(timesteps.update)
    for batch in range(6):
        # Repeated t's, including more repeats of one t than the history holds.
        t = rng.integers(0, 7, size=9) if batch % 2 else np.array([2] * 5 + [4, 2, 0, 4])
        values = rng.uniform(0, 5, size=9).astype(np.float32)
        history = update(history, jnp.asarray(t), jnp.asarray(values))
        losses, counts = loop_update(losses, counts, t, values, 3)
        np.testing.assert_array_equal(history.losses, losses)
        np.testing.assert_array_equal(history.counts, counts)


def test_probabilities_uniform_until_full_then_second_moment():
    size = 4
    history = timesteps.init_history(5, size=size)
    filled = np.abs(np.random.default_rng(1).standard_normal((5, size))).astype(np.float32)
    partial = history.replace(losses=jnp.asarray(filled), counts=jnp.asarray([4, 4, 3, 4, 4]))
    np.testing.assert_allclose(timesteps.probabilities(partial), np.full(5, 0.2), rtol=1e-6)
    full = partial.replace(counts=jnp.full((5,), size))
    w = np.sqrt((filled.astype(np.float64) ** 2).mean(axis=1))
    want = (1 - timesteps.UNIFORM_SHARE) * w / w.sum() + timesteps.UNIFORM_SHARE / 5
    got = timesteps.probabilities(full)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(float(jnp.sum(got)), 1.0, rtol=1e-6)
    t, weights = timesteps.sample(jax.random.key(0), full, 6, 5)
    np.testing.assert_allclose(weights, 1 / (5 * want[np.asarray(t)]), rtol=1e-5)
    t, weights = timesteps.sample(jax.random.key(0), None, 6, 5)
    assert weights is None and t.shape == (6,) and int(t.min()) >= 0 and int(t.max()) < 5


def test_weighted_bound_is_unbiased_against_bpd_loop():
    """With p_t from a full history of the bound's own terms, T·mean(w_t L_t) over t ~ p_t
    estimates Σ_t L_t of bpd_loop (the bound less L_T), with a far smaller variance than
    the uniform draw."""
    T = 20
    sched = schedules.make_schedule("linear", num_timesteps=T, beta_end=0.2)
    spec = diffusion.DiffusionSpec("eps", "fixedsmall", "kl", clip_x0=False)
    x0 = (
        jnp.round(jax.random.uniform(jax.random.key(1), (4, 4, 4, 1), minval=-1, maxval=1) * 127.5)
        / 127.5
    )
    model = lambda x_t, t: 0.6 * x_t
    keys = reverse.example_keys(jax.random.key(2), 4)
    terms = diffusion.bpd_loop(sched, spec, model, x0, keys)["terms_bpd"].mean(0)  # L_t, (T,)
    history = timesteps.init_history(T, size=2)
    history = history.replace(
        losses=jnp.stack([terms, terms], axis=1), counts=jnp.full((T,), 2, jnp.int32)
    )
    n = 200_000
    t, w = timesteps.sample(jax.random.key(3), history, n, T)
    estimates = np.asarray(T * w * terms[t], np.float64)
    want = float(jnp.sum(terms))
    stderr = estimates.std() / np.sqrt(n)
    assert abs(estimates.mean() - want) < 4 * stderr + 1e-6 * want, (estimates.mean(), want)
    uniform = np.asarray(T * terms[jax.random.randint(jax.random.key(4), (n,), 0, T)])
    np.testing.assert_allclose(uniform.mean(), want, rtol=0.02)
    assert estimates.std() < 0.1 * uniform.std()  # p_t ∝ L_t: nearly constant estimates
    assert float(np.max(terms) / np.min(terms)) > 10  # a test that could tell them apart
