"""solvers: DPM-Solver++ 2M/3M, SDE-DPM-Solver++ 2M and UniPC-2/3 (bh2) against diffusers'
trajectories (tests/fixtures/make_solver_references.py), the exact probability-flow ODE of
Gaussian data approached as steps grow, per-sample SDE noise, and the timestep spacings."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import reverse, schedules, solvers
from ddpm_jax.spec import DiffusionSpec, SamplerMethod

REFERENCES = np.load(Path(__file__).parent / "data" / "solver_references.npz")
SCHED = schedules.schedule_from_betas(np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
SOLVERS = {
    "dpmpp_2m": SamplerMethod.DPMPP_2M,
    "dpmpp_3m": SamplerMethod.DPMPP_3M,
    "sde_dpmpp_2m": SamplerMethod.SDE_DPMPP_2M,
    "unipc_2": SamplerMethod.UNIPC_2,
    "unipc_3": SamplerMethod.UNIPC_3,
}


def analytic_model(x, t):
    """The references' network: 0.6 tanh(x) + 0.1 sin((1 + t/500) x)."""
    t = t.astype(jnp.float32)[:, None, None, None]
    return 0.6 * jnp.tanh(x) + 0.1 * jnp.sin((1.0 + t / 500.0) * x)


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_trajectories_match_diffusers(name, prediction, steps):
    key = f"{name}/{prediction}/{steps}"
    timesteps = REFERENCES[f"{key}/timesteps"]
    np.testing.assert_array_equal(timesteps, solvers.spaced_timesteps(1000, steps))
    spec = DiffusionSpec(mean_type=prediction, clip_x0=False)
    noise = REFERENCES[f"{key}/noise"] if f"{key}/noise" in REFERENCES else None
    xs = solvers.solve(
        SCHED, spec, analytic_model, jnp.asarray(REFERENCES["x_T"]), timesteps,
        SOLVERS[name], noise=None if noise is None else jnp.asarray(noise), trajectory=True,
    )  # fmt: skip
    want = REFERENCES[f"{key}/x"]
    scale = np.abs(want).max(axis=(1, 2, 3, 4), keepdims=True)  # per step
    np.testing.assert_allclose(np.asarray(xs) / scale, want / scale, rtol=0, atol=2e-5)


def gaussian_data_model(s):
    """ε̂ of the ideal denoiser for data x_0 ~ N(0, s² I): x̂_0 = α s² x / (α² s² + σ²)."""

    def model(x, t):
        ab = SCHED.alphas_cumprod[t][:, None, None, None]
        alpha, sigma = jnp.sqrt(ab), jnp.sqrt(1 - ab)
        x0 = alpha * s**2 * x / (ab * s**2 + sigma**2)
        return (x - alpha * x0) / sigma

    return model


@pytest.mark.parametrize(
    "solver",
    [SamplerMethod.DPMPP_2M, SamplerMethod.DPMPP_3M, SamplerMethod.UNIPC_2, SamplerMethod.UNIPC_3],
)
def test_more_steps_approach_the_exact_ode_solution(solver):
    """For Gaussian data the probability-flow ODE scales x by the ratio of marginal stds,
    x_t = √(ᾱ_t s² + 1 - ᾱ_t) / √(ᾱ_T s² + 1 - ᾱ_T) x_T. On steps from t = 999 to t = 99 (then
    the jump to σ = 0), the error at t = 99 falls with every halving of the steps and by at
    least second order over three (8x the steps: > 50x; integer timesteps make the step
    ratios uneven, so single halvings vary: 2M 8.6-14x, 3M 3.9-5.9x, UniPC-2 2.1-11x)."""
    s = 0.5
    x_T = jax.random.normal(jax.random.key(0), (4, 4, 4, 1))
    spec = DiffusionSpec(mean_type="eps", clip_x0=False)
    ab = np.asarray(SCHED.alphas_cumprod, np.float64)
    exact = np.sqrt(ab[99] * s**2 + 1 - ab[99]) / np.sqrt(ab[999] * s**2 + 1 - ab[999]) * x_T
    errors = []
    for steps in (10, 20, 40, 80):
        ts = np.round(np.linspace(999, 99, steps)).astype(np.int32)
        xs = solvers.solve(SCHED, spec, gaussian_data_model(s), x_T, ts, solver, trajectory=True)
        errors.append(float(jnp.max(jnp.abs(xs[-2] - exact))))
    ratios = [a / b for a, b in zip(errors, errors[1:], strict=False)]
    assert min(ratios) > 2 and errors[0] / errors[-1] > 50 and errors[-1] < 2e-4, errors


def test_sde_noise_depends_on_the_sample_alone():
    keys = reverse.example_keys(jax.random.key(1), 4)
    x_T = jax.random.normal(jax.random.key(2), (4, 4, 4, 1))
    spec, ts = DiffusionSpec(mean_type="eps", clip_x0=False), solvers.spaced_timesteps(1000, 10)
    sde = SamplerMethod.SDE_DPMPP_2M
    four = solvers.solve(SCHED, spec, analytic_model, x_T, ts, sde, noise=keys)
    two = solvers.solve(SCHED, spec, analytic_model, x_T[2:], ts, sde, noise=keys[2:])
    np.testing.assert_allclose(four[2:], two, rtol=1e-6, atol=1e-6)
    ode = solvers.solve(SCHED, spec, analytic_model, x_T, ts, SamplerMethod.DPMPP_2M)
    assert float(jnp.max(jnp.abs(four - ode))) > 1e-2  # the noise does something
    with pytest.raises(ValueError, match="give `noise`"):
        solvers.solve(SCHED, spec, analytic_model, x_T, ts, sde)


def test_spacings_and_orders():
    np.testing.assert_array_equal(
        solvers.spaced_timesteps(1000, 10, "leading"),
        [900, 800, 700, 600, 500, 400, 300, 200, 100, 0],
    )
    np.testing.assert_array_equal(
        solvers.spaced_timesteps(1000, 10, "trailing"),
        [999, 899, 799, 699, 599, 499, 399, 299, 199, 99],
    )
    np.testing.assert_array_equal(solvers.spaced_timesteps(1000, 4), [999, 749, 500, 250])
    assert solvers.step_orders(10, 3) == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
    assert solvers.step_orders(20, 3) == [1, 2] + [3] * 17 + [1]
    assert solvers.step_orders(3, 2) == [1, 2, 1]
    assert solvers.step_orders(10, 3, "unipc3") == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
    assert solvers.step_orders(20, 3, "unipc3") == [1, 2] + [3] * 16 + [2, 1]
    with pytest.raises(ValueError, match="decreasing"):
        solvers.solve(SCHED, DiffusionSpec(), analytic_model, jnp.zeros((1, 2, 2, 1)), [1, 5])


@pytest.mark.parametrize("method", ["dpm++2m", "sde-dpm++2m"])
def test_sample_fn_runs_a_solver_as_its_whole_chain(tiny_model, method):
    """config.sampling.method picks the solver: sample_fn equals solvers.solve over the
    spaced timesteps of the trained schedule (no respacing) as one program, and with the
    SDE's noise sample i still depends on (rng, i) alone (4 samples: the first 4 of 8)."""
    from ddpm_jax import config_lib, sampling

    config = tiny_model[0].copy_and_resolve_references()
    config.sampling.update(method=method, num_steps=6, spacing="trailing", batch_size=8)
    setup, params = config_lib.build(config), tiny_model[2]
    sample_fn = sampling.make_sample_fn(setup)
    rng = jax.random.PRNGKey(5)
    got = sample_fn(params, rng, 8, output="float")
    keys = reverse.example_keys(rng, 8)
    model_fn = lambda x, t: setup.model.apply({"params": params}, x, t)  # noqa: E731
    ts = solvers.spaced_timesteps(20, 6, "trailing")
    want = solvers.solve(
        setup.schedule, setup.diffusion, model_fn, reverse.initial_noise(keys, (8, 8, 1), 6),
        ts, setup.sampler.method, keys,
    )  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert sample_fn.length == 6 and sample_fn.segment._cache_size() == 1  # one program
    if setup.sampler.method == SamplerMethod.SDE_DPMPP_2M:  # noise of sample i: (rng, i)
        np.testing.assert_allclose(sample_fn(params, rng, 4, output="float"), got[:4], atol=1e-5)


@pytest.mark.parametrize("solver", [SamplerMethod.DPMPP_3M, SamplerMethod.UNIPC_2])
def test_a_learned_range_model_is_solved_on_its_mean_half(solver):
    """The variance half of a learned-range model's output changes nothing in an ODE step."""
    x_T = jax.random.normal(jax.random.key(9), (2, 4, 4, 1))
    learned = DiffusionSpec(
        mean_type="v", var_type="learned_range", loss_type="hybrid", clip_x0=False
    )
    ts = solvers.spaced_timesteps(1000, 8)

    def with_variance(x, t):
        return jnp.concatenate([analytic_model(x, t), jnp.cos(3 * x)], axis=-1)

    got = solvers.solve(SCHED, learned, with_variance, x_T, ts, solver)
    mean_only = DiffusionSpec(mean_type="v", clip_x0=False)
    np.testing.assert_allclose(
        got, solvers.solve(SCHED, mean_only, analytic_model, x_T, ts, solver)
    )
