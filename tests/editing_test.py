"""editing: DDIM inversion against diffusers' DDIMInverseScheduler and as the inverse of
DDIM sampling, SDEdit and RePaint (what they keep, their schedules), on analytic models."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from solvers_test import SCHED, analytic_model, gaussian_data_model

from ddpm_jax import editing, reverse, schedules, solvers
from ddpm_jax.spec import DiffusionSpec, SamplerMethod, SamplerSpec

REFERENCES = np.load(Path(__file__).parent / "data" / "solver_references.npz")
EPS = DiffusionSpec(mean_type="eps", clip_x0=False)


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_inversion_matches_diffusers(prediction, steps):
    key = f"ddim_inverse/{prediction}/{steps}"
    timesteps = REFERENCES[f"{key}/timesteps"]
    np.testing.assert_array_equal(timesteps, solvers.spaced_timesteps(1000, steps, "leading")[::-1])
    spec = DiffusionSpec(mean_type=prediction, clip_x0=False)
    x_0 = jnp.asarray(REFERENCES["x_0"])
    xs = editing.invert(SCHED, spec, analytic_model, x_0, timesteps, trajectory=True)
    want = REFERENCES[f"{key}/x"]
    scale = np.abs(want).max(axis=(1, 2, 3, 4), keepdims=True)
    np.testing.assert_allclose(np.asarray(xs) / scale, want / scale, rtol=0, atol=2e-5)


def test_inversion_then_ddim_reconstructs_x0_better_with_more_steps():
    """For the ideal denoiser of Gaussian data the ODE is exact, so invert-then-sample comes
    back to x_0 up to the two first-order discretizations: the error halves as N doubles
    (0.14, 0.070, 0.035 at 10, 20, 40 steps)."""
    x_0 = 0.5 * jax.random.normal(jax.random.key(3), (4, 4, 4, 1))
    model, errors = gaussian_data_model(0.5), []
    for steps in (10, 20, 40):
        ts = solvers.spaced_timesteps(1000, steps, "leading")
        x_T = editing.invert(SCHED, EPS, model, x_0, ts[::-1])
        back = solvers.solve(SCHED, EPS, model, x_T, ts, SamplerMethod.DDIM)
        errors.append(float(jnp.sqrt(jnp.mean((back - x_0) ** 2))))
    assert errors[0] > 1.8 * errors[1] and errors[1] > 1.8 * errors[2], errors  # first order
    assert errors[2] < 0.04, errors
    with pytest.raises(ValueError, match="'eps' or 'v' model"):
        editing.invert(SCHED, DiffusionSpec(mean_type="x0"), model, x_0, ts[::-1])


def test_ddim_through_the_solver_interface_is_the_respaced_ddim_chain():
    ts = schedules.space_timesteps(1000, 10)[::-1]
    x_T = jax.random.normal(jax.random.key(4), (2, 4, 4, 1))
    got = solvers.solve(SCHED, EPS, analytic_model, x_T, ts, SamplerMethod.DDIM)
    sched, model_fn = reverse.respaced(SCHED, analytic_model, 10)
    ddim = SamplerSpec(method="ddim", eta=0.0)
    want = reverse.sample_loop(sched, EPS, model_fn, x_T, jax.random.key(0), sampler=ddim)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def half_mask(shape=(2, 4, 4, 1)):
    """1 (regenerate) on the left half, 0 (keep) on the right."""
    return jnp.broadcast_to((jnp.arange(shape[2]) < shape[2] // 2)[:, None], shape[1:])[None]


@pytest.mark.parametrize("solver", [SamplerMethod.DPMPP_2M, SamplerMethod.UNIPC_3])
def test_sdedit_strength_and_mask(solver):
    x_0 = jnp.clip(jax.random.normal(jax.random.key(5), (2, 4, 4, 1)), -1, 1)
    keys = reverse.example_keys(jax.random.key(6), 2)
    ts = solvers.spaced_timesteps(1000, 20)
    assert len(editing.strength_timesteps(ts, 0.5)) == 10
    none = editing.sdedit(SCHED, EPS, analytic_model, x_0, ts[20:], keys, solver)
    np.testing.assert_array_equal(none, x_0)  # strength 0: the input back
    tail, mask = editing.strength_timesteps(ts, 0.6), half_mask()
    got = editing.sdedit(SCHED, EPS, analytic_model, x_0, tail, keys, solver, mask=mask)
    kept = ~np.asarray(jnp.broadcast_to(mask, x_0.shape)).astype(bool)
    np.testing.assert_array_equal(np.asarray(got)[kept], np.asarray(x_0)[kept])
    assert float(jnp.max(jnp.abs(got - x_0))) > 0.1  # the masked half was regenerated
    free = editing.sdedit(SCHED, EPS, analytic_model, x_0, tail, keys, solver)
    assert float(jnp.max(jnp.abs((free - x_0)[kept]))) > 0.05  # without a mask it moves
    with pytest.raises(ValueError, match="strength"):
        editing.strength_timesteps(ts, 1.5)


def test_repaint_levels_follow_the_jump_schedule():
    levels = editing.repaint_levels(30, jump_length=10, jump_n_sample=3)
    moves = np.diff(levels)
    assert levels[0] == 29 and levels[-1] == -1 and set(moves) == {-1, 1}
    # Jumps from levels 0 and 10 (below 30 - 10), two each, 10 levels up and down again.
    assert (moves == 1).sum() == 2 * 2 * 10 and (moves == -1).sum() == 30 + 2 * 2 * 10
    first_up = int(np.argmax(moves == 1))
    assert levels[first_up] == 10 and list(levels[first_up : first_up + 12]) == [
        10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 19,
    ]  # fmt: skip
    np.testing.assert_array_equal(editing.repaint_levels(30, 10, 1), np.arange(29, -2, -1))
    np.testing.assert_array_equal(editing.repaint_levels(30, 5, 1, top=7), np.arange(7, -2, -1))
    with pytest.raises(ValueError, match="jump_length"):
        editing.repaint_levels(30, 0, 2)


def test_repaint_keeps_the_known_pixels_and_fills_the_rest():
    sched = schedules.schedule_from_betas(np.linspace(1e-4, 0.2, 30, dtype=np.float64))
    x_0 = jnp.clip(jax.random.normal(jax.random.key(7), (2, 4, 4, 1)), -1, 1)
    keys, mask = reverse.example_keys(jax.random.key(8), 2), half_mask()
    levels = editing.repaint_levels(30, jump_length=5, jump_n_sample=3)
    spec = DiffusionSpec(mean_type="eps")
    got = jax.jit(lambda x, m: editing.repaint(sched, spec, analytic_model, x, m, keys, levels))(
        x_0, mask
    )
    kept = ~np.asarray(jnp.broadcast_to(mask, x_0.shape)).astype(bool)
    np.testing.assert_array_equal(np.asarray(got)[kept], np.asarray(x_0)[kept])
    assert float(jnp.max(jnp.abs(got - x_0))) > 0.1 and float(jnp.max(jnp.abs(got))) <= 1.0
    # Sample i depends on (key_i, x_0^i) alone.
    one = editing.repaint(sched, spec, analytic_model, x_0[1:], mask, keys[1:], levels)
    np.testing.assert_allclose(one, got[1:], rtol=1e-5, atol=1e-6)
