"""The reverse process: scan vs a plain loop, the right distribution, devices, one trace."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mnist_data_dir

from ddpm_jax import (
    checkpointing,
    config_lib,
    diffusion,
    images,
    reverse,
    sampling,
    schedules,
    training,
)
from ddpm_jax.errors import UserError
from ddpm_jax.spec import SamplerSpec


def ddim(eta):
    return SamplerSpec("ddim", eta=eta)


ROOT = Path(__file__).resolve().parents[1]


def toy_model(x_t, t):
    return 0.5 * x_t + 0.01 * t[:, None, None, None].astype(x_t.dtype)


def S(mean_type, var_type, clip_x0=True):
    """The spec of a model (a learned variance is trained by the bound)."""
    loss = "kl" if var_type == "learned_range" else "mse"
    return diffusion.DiffusionSpec(mean_type, var_type, loss, clip_x0)


def toy_model_for(spec):
    """toy_model, with a variance output in [-1, 1] when the spec learns one."""
    if not spec.learned_variance:
        return toy_model
    return lambda x_t, t: jnp.concatenate([toy_model(x_t, t), jnp.tanh(x_t)], axis=-1)


@pytest.mark.parametrize("mean_type", diffusion.MEAN_TYPES)
@pytest.mark.parametrize("var_type", diffusion.VAR_TYPES)
def test_scan_equals_plain_loop(mean_type, var_type):
    sched = schedules.make_schedule("linear", num_timesteps=10, beta_end=0.2)
    keys = reverse.example_keys(jax.random.key(0), 3)
    x_T = reverse.initial_noise(keys, (4, 4, 1), 10)
    spec = S(mean_type, var_type, True)
    model = toy_model_for(spec)
    got = jax.jit(lambda x: reverse.sample_loop(sched, spec, model, x, keys))(x_T)
    x = x_T
    for t in reversed(range(10)):
        t_b = jnp.full((3,), t)
        z = reverse.keyed_normal(keys, t, (4, 4, 1))
        x = diffusion.p_sample(sched, spec, model(x, t_b), x, t_b, z)
    np.testing.assert_allclose(got, x, rtol=1e-5, atol=1e-5)


def test_scan_is_algorithm_2_written_out():
    """ε-prediction, σ² = β, no clipping: x_{t-1} = (x_t - β_t/√(1-ᾱ_t) ε_θ)/√α_t + σ_t z."""
    T = 10
    betas = np.linspace(1e-4, 0.2, T)
    ab = np.cumprod(1 - betas)
    sched = schedules.make_schedule("linear", num_timesteps=T, beta_end=0.2)
    keys = reverse.example_keys(jax.random.key(1), 2)
    x_T = reverse.initial_noise(keys, (4, 4, 1), T)
    got = reverse.sample_loop(sched, S("eps", "fixedlarge", False), toy_model, x_T, keys)
    x = np.asarray(x_T, np.float64)
    for t in reversed(range(T)):
        eps = 0.5 * x + 0.01 * t
        z = np.asarray(reverse.keyed_normal(keys, t, (4, 4, 1))) if t > 0 else 0.0
        x = (x - betas[t] / np.sqrt(1 - ab[t]) * eps) / np.sqrt(1 - betas[t]) + np.sqrt(
            betas[t]
        ) * z
    np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)


def test_exact_predictor_samples_the_data_distribution():
    """Data x_0 ~ N(m, s² I): with E[ε|x_t] in closed form the samples have mean m, var s²."""
    m, s = 0.3, 0.5
    sched = schedules.make_schedule("linear")

    def exact_eps(x_t, t):
        ab = sched.alphas_cumprod[t][:, None, None, None]
        v = ab * s**2 + 1 - ab  # Var(x_t)
        return jnp.sqrt(1 - ab) * (x_t - jnp.sqrt(ab) * m) / v

    keys = reverse.example_keys(jax.random.key(2), 4000)
    x_T = reverse.initial_noise(keys, (2, 2, 1), 1000)
    # Ancestral (Algorithm 2), and deterministic DDIM over all steps.
    for sampler in (SamplerSpec("ancestral"), ddim(0.0)):
        run = jax.jit(
            lambda x, s=sampler: reverse.sample_loop(
                sched, S("eps", "fixedsmall", False), exact_eps, x, keys, sampler=s
            )
        )
        x0 = np.asarray(run(x_T)).ravel()
        n = x0.size
        assert abs(x0.mean() - m) < 4 * s / np.sqrt(n)
        assert abs(x0.var() / s**2 - 1) < 4 * np.sqrt(2 / n) + 0.01


def test_sample_fn_devices_chunks_and_one_trace(tiny_model):
    config, _, params = tiny_model
    config = config.copy_and_resolve_references()
    config.sampling.batch_size = 4
    on_four = sampling.make_sample_fn(config)
    a = on_four(params, jax.random.PRNGKey(0), 6)
    b = on_four(params, jax.random.PRNGKey(0), 6)
    c = on_four(params, jax.random.PRNGKey(1), 3)
    assert a.shape == (6, 8, 8, 1) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[:3], c)
    assert on_four.segment._cache_size() == 1  # every call, chunk and segment: one program
    config.sampling.batch_size = 6
    on_one = sampling.make_sample_fn(config, devices=jax.devices()[:1])
    d = on_one(params, jax.random.PRNGKey(0), 6, output="float")
    assert d.dtype == np.float32 and -1 <= d.min() and d.max() <= 1
    # Same images on 1 device in one chunk of 6 as on 4 devices in chunks of 4.
    np.testing.assert_allclose(images.to_uint8(d).astype(int), a.astype(int), atol=1)
    assert np.mean(images.to_uint8(d) == a) > 0.99


def test_restore_params_reads_the_ema_weights(tmp_path, tiny_model):

    config = tiny_model[0].copy_and_resolve_references()
    config.data.data_dir = str(mnist_data_dir())
    trainer = training.Trainer(config, tmp_path)
    state = trainer.init()
    state = state.replace(ema_params=jax.tree.map(lambda a: a + 1.0, state.ema_params))
    manager = checkpointing.make_manager(tmp_path)
    checkpointing.save(manager, state, config)
    manager.wait_until_finished()
    restored, step = checkpointing.restore_params(tmp_path, config)
    jax.tree.map(np.testing.assert_array_equal, restored, state.ema_params)
    assert step == 0
    with pytest.raises(ValueError, match="no checkpoint"):
        checkpointing.restore_params(tmp_path / "elsewhere", config)


def linear10():
    return schedules.make_schedule("linear", num_timesteps=10, beta_end=0.2)


def test_ddim_eta1_is_ancestral_and_eta0_is_deterministic():
    sched = linear10()
    keys = reverse.example_keys(jax.random.key(3), 4)
    x_T = reverse.initial_noise(keys, (4, 4, 1), 10)
    ancestral = reverse.sample_loop(sched, S("eps", "fixedsmall", True), toy_model, x_T, keys)
    ddim1 = reverse.sample_loop(
        sched, S("eps", "fixedsmall", True), toy_model, x_T, keys, sampler=ddim(1.0)
    )
    np.testing.assert_allclose(ddim1, ancestral, rtol=1e-4, atol=1e-5)
    other_keys = reverse.example_keys(jax.random.key(4), 4)
    a = reverse.sample_loop(
        sched, S("eps", "fixedsmall", True), toy_model, x_T, keys, sampler=ddim(0.0)
    )
    b = reverse.sample_loop(
        sched, S("eps", "fixedsmall", True), toy_model, x_T, other_keys, sampler=ddim(0.0)
    )
    np.testing.assert_array_equal(a, b)
    assert float(jnp.max(jnp.abs(a - ancestral))) > 1e-3


def test_respacing():
    sched = schedules.make_schedule("linear")
    short, short_model = reverse.respaced(sched, toy_model, 50)
    kept = schedules.space_timesteps(1000, 50)
    assert short.num_timesteps == 50 and kept[0] == 0 and kept[-1] == 999
    np.testing.assert_allclose(
        short.alphas_cumprod, np.asarray(sched.alphas_cumprod)[kept], rtol=1e-5
    )
    x, t = jnp.ones((2, 4, 4, 1)), jnp.array([0, 49])
    np.testing.assert_allclose(short_model(x, t), toy_model(x, jnp.array([0, 999])))
    # All steps kept: the very same chain.
    sched10 = linear10()
    full, full_model = reverse.respaced(sched10, toy_model, 10)
    keys = reverse.example_keys(jax.random.key(5), 3)
    x_T = reverse.initial_noise(keys, (4, 4, 1), 10)
    want = reverse.sample_loop(sched10, S("eps", "fixedlarge", True), toy_model, x_T, keys)
    got = reverse.sample_loop(full, S("eps", "fixedlarge", True), full_model, x_T, keys)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_progressive_snapshots():
    sched = linear10()
    keys = reverse.example_keys(jax.random.key(6), 2)
    x_T = reverse.initial_noise(keys, (4, 4, 1), 10)
    x0, prog = reverse.sample_loop(
        sched, S("eps", "fixedsmall", True), toy_model, x_T, keys, every=5
    )
    assert prog["x_t"].shape == (2, 2, 4, 4, 1) and prog["x0_pred"].shape == (2, 2, 4, 4, 1)
    np.testing.assert_array_equal(prog["x_t"][-1], x0)
    five = reverse.sample_loop(
        sched, S("eps", "fixedsmall", True), toy_model, x_T, keys, t_start=None
    )
    np.testing.assert_allclose(five, x0, rtol=1e-6)
    # The first snapshot is the chain after 5 steps: continuing it from t=4 gives x_0.
    rest = reverse.sample_loop(
        sched, S("eps", "fixedsmall", True), toy_model, prog["x_t"][0], keys, t_start=4
    )
    np.testing.assert_allclose(rest, x0, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="every=3"):
        reverse.sample_loop(sched, S("eps", "fixedsmall", True), toy_model, x_T, keys, every=3)


def test_interpolation_endpoints():
    sched = linear10()
    x_a, x_b = jnp.full((4, 4, 1), -0.5), jnp.full((4, 4, 1), 0.5)
    out = reverse.interpolate(
        sched, S("eps", "fixedsmall"), toy_model, x_a, x_b, 6, [0.0, 0.5, 1.0], jax.random.key(7)
    )
    assert out.shape == (3, 4, 4, 1)
    # λ = 0 and 1 decode the two encodings with the same reverse noise: the middle lies between.
    assert float(jnp.mean(out[0])) < float(jnp.mean(out[1])) < float(jnp.mean(out[2]))


def test_from_shared_x_t():
    sched = linear10()
    x_t = jax.random.normal(jax.random.key(8), (4, 4, 1))
    keys = reverse.example_keys(jax.random.key(9), 3)
    late = reverse.from_shared_x_t(sched, S("eps", "fixedsmall"), toy_model, x_t, 6, keys)
    assert late.shape == (3, 4, 4, 1) and float(jnp.std(late, axis=0).mean()) > 1e-3
    # From step 0 only the noiseless last step remains: every sample is the same.
    first = reverse.from_shared_x_t(sched, S("eps", "fixedsmall"), toy_model, x_t, 0, keys)
    np.testing.assert_array_equal(first[0], first[1])
    np.testing.assert_array_equal(first[1], first[2])


def test_segment_lengths_divide_the_chain():
    assert reverse.segment_length(1000) == 50  # 20 segments
    assert reverse.segment_length(20) == 1 and reverse.segment_length(1) == 1
    assert reverse.segment_length(50) == 2 and reverse.segment_length(4000) == 200
    assert reverse.segment_length(997) == 1  # a prime: one step per segment
    for n in range(1, 300):
        k = reverse.segment_length(n)
        assert n % k == 0 and k <= -(-n // 20)
        assert all(n % j for j in range(k + 1, -(-n // 20) + 1))  # the largest such


@pytest.mark.parametrize("method, num_steps", [("ancestral", 0), ("ddim", 5)])
def test_segmented_chain_equals_the_whole_chain(tiny_model, method, num_steps, capsys):
    """sample_fn (chain cut into segments, chunks no larger than needed, a bar over reverse
    steps) draws what `sample` draws as one scan, for the same samples i."""
    config, model, params = tiny_model
    config = config.copy_and_resolve_references()
    config.sampling.update(batch_size=8, method=method, num_steps=num_steps)
    rng = jax.random.PRNGKey(11)
    whole = reverse.sample(params, rng, setup=config_lib.build(config), num_samples=8)
    sample_fn = sampling.make_sample_fn(config, progress=True)
    got = sample_fn(params, rng, 8, output="float")
    np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-5)
    steps = num_steps or config.diffusion.num_timesteps
    assert f"{steps}/{steps}" in capsys.readouterr().err  # the bar counted every step
    # 3 samples: one chunk of 4 (the device count), not of 8; samples 0-2 unchanged.
    chunks = list(sample_fn.chunks(params, rng, 3))
    assert [c.shape[0] for c in chunks] == [4]
    np.testing.assert_allclose(chunks[0][:3], whole[:3], rtol=1e-5, atol=1e-5)
    assert sample_fn.segment._cache_size() == 2  # one program per chunk size (8 and 4)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_sample_fn_names_a_bad_sample_count(tiny_model, bad):
    config, _, params = tiny_model
    with pytest.raises(UserError, match="num_samples must be"):
        sampling.make_sample_fn(config)(params, jax.random.PRNGKey(0), bad)


def test_sample_fn_refuses_more_samples_than_memory_holds(tiny_model):
    """10^12 images of 8x8 need 2.4e5 GiB as float32: refused at once, not after an ETA of
    millions of hours."""
    config, _, params = tiny_model
    with pytest.raises(
        UserError, match=r"^num_samples=1000000000000 needs 2.38e\+05 GiB for its images, more than"
    ):
        sampling.make_sample_fn(config)(params, jax.random.PRNGKey(0), 10**12)


@pytest.mark.parametrize("method", ["ancestral", "ddim"])
def test_sample_fn_with_a_learned_variance_on_a_respaced_chain(tiny_model, method):
    """sample_fn of a learned-Σ, v-prediction model over 5 respaced steps is sample_loop over
    the respaced schedule (Σ from its β's), sample for sample."""
    from conftest import randomize

    config = tiny_model[0].copy_and_resolve_references()
    config.diffusion.update(mean_type="v", var_type="learned_range", loss_type="hybrid")
    config.sampling.update(num_steps=5, method=method, eta=0.0, batch_size=4)
    setup = config_lib.build(config)
    x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
    params = randomize(jax.jit(setup.model.init)(jax.random.key(0), x, t)["params"], seed=2)
    assert params["conv_out"]["kernel"].shape[-1] == 2  # mean and Σ_θ outputs
    got = sampling.make_sample_fn(setup)(params, jax.random.PRNGKey(3), 4, output="float")
    model_fn = lambda x, t: setup.model.apply({"params": params}, x, t)
    short, short_model = reverse.respaced(setup.schedule, model_fn, 5)
    keys = reverse.example_keys(jax.random.PRNGKey(3), 4)
    x_T = reverse.initial_noise(keys, (8, 8, 1), 5)
    assert setup.sampler == SamplerSpec(method, num_steps=5, eta=0.0, batch_size=4)
    want = reverse.sample_loop(
        short, setup.diffusion, short_model, x_T, keys, sampler=setup.sampler
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
