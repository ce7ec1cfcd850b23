"""Training: the step, its sharding, resume, and the loop's guarantees (tiny config, CPU)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mnist_data_dir

from ddpm_jax import (
    config_lib,
    diffusion,
    input_pipeline,
    sharding,
    timesteps,
    train_state,
    training,
)

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**training):
    config = config_lib.load_config(ROOT / "configs" / "tiny.py")
    config.data.data_dir = str(mnist_data_dir())
    config.training.sample_every = 0
    config.training.update(training)
    return config


def fixed_batch(n=8, seed=0):
    return next(input_pipeline.train_iterator(tiny_config(), n, seed=seed))


def allclose(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return training.Trainer(tiny_config(), tmp_path_factory.mktemp("work"))


def test_one_step_golden_numbers_and_single_trace(trainer):
    state = trainer.init()
    x0 = sharding.global_batch(fixed_batch(), trainer.mesh)
    state, metrics = trainer.train_step(state, x0)
    # Pinned: the tiny config's first step on the first 8 training images of seed 0.
    np.testing.assert_allclose(float(metrics["loss"]), 1.126384, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["grad_norm"]), 2.678390, rtol=1e-4)
    assert float(metrics["lr"]) == 0.0  # warmup starts at 0, as in the authors' code
    assert int(state.step) == 1
    for _ in range(4):
        state, metrics = trainer.train_step(state, x0)
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 5
    np.testing.assert_allclose(float(metrics["lr"]), 1e-3)  # warmup of 2 steps is over
    assert trainer.train_step._cache_size() == 1  # traced and compiled once


def test_ema_and_adam_update(trainer):
    """EMA after update n is d_n·EMA + (1 - d_n)·θ_{n+1}, exactly: with the warm-up (the tiny
    and MNIST configs) d_n = min(d, (1 + n) / (10 + n)); without it (the paper's) d_n = d."""
    state0 = trainer.init()
    params0 = jax.tree.map(np.asarray, state0.params)
    x0 = sharding.global_batch(fixed_batch(), trainer.mesh)
    state1, _ = trainer.train_step(trainer.init(), x0)
    params1 = jax.tree.map(np.array, state1.params)  # a copy: state1 is donated below
    state2, _ = trainer.train_step(state1, x0)
    allclose(params1, params0)  # the first update has lr 0 (warmup from 0): EMA_1 = θ_1
    spec = trainer.setup.training
    assert spec.ema_warmup
    d = min(spec.ema_decay, 2 / 11)  # update n = 1
    want = jax.tree.map(lambda e, p: d * e + (1 - d) * p, params1, state2.params)
    allclose(state2.ema_params, want)
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), state2.params, params1)
    assert max(jax.tree.leaves(moved)) > 1e-4
    for n in (0, 1, 50, 10**5):
        want = min(spec.ema_decay, (1 + n) / (10 + n))
        np.testing.assert_allclose(float(train_state.ema_decay_at(spec, n)), want, rtol=1e-6)
    paper = config_lib.build(config_lib.load_config(ROOT / "configs" / "cifar.py")).training
    assert not paper.ema_warmup and train_state.ema_decay_at(paper, 0) == 0.9999


def test_overfits_a_fixed_batch(tmp_path):
    trainer = training.Trainer(tiny_config(learning_rate=2e-3, warmup_steps=5), tmp_path)
    state, x0 = trainer.init(), sharding.global_batch(fixed_batch(seed=1), trainer.mesh)
    losses = []
    for _ in range(100):
        state, metrics = trainer.train_step(state, x0)
        losses.append(metrics["loss"])
    losses = np.asarray(jax.device_get(losses))  # per-step L_simple at random t: noisy
    first, middle, last = losses[:10].mean(), losses[35:65].mean(), losses[70:].mean()
    assert last < 0.35 * first and middle < 0.6 * first, (first, middle, last)


def test_four_devices_equal_one(tmp_path):
    assert len(jax.devices()) == 4
    batches = [fixed_batch(seed=s) for s in range(3)]
    finals = []
    for devices in (jax.devices()[:1], jax.devices()):
        trainer = training.Trainer(tiny_config(), tmp_path / str(len(devices)), devices)
        state = trainer.init()
        for batch in batches:
            state, _ = trainer.train_step(state, sharding.global_batch(batch, trainer.mesh))
        assert len(state.params["conv_in"]["kernel"].sharding.device_set) == len(devices)
        finals.append(jax.tree.map(np.asarray, state))
    # Same numbers up to float32 reduction order (Adam's m/√v amplifies it for tiny gradients).
    allclose(finals[0].params, finals[1].params, rtol=1e-4, atol=1e-5)
    allclose(finals[0].opt_state, finals[1].opt_state, rtol=1e-3, atol=3e-6)


def final_state(workdir):
    trainer = training.Trainer(tiny_config(), workdir)
    return jax.tree.map(np.asarray, trainer.restore()[0])


def test_resume_is_exact(tmp_path):
    training.train_and_evaluate(tiny_config(num_steps=4, checkpoint_every=2), tmp_path / "a")
    training.train_and_evaluate(tiny_config(num_steps=8, checkpoint_every=2), tmp_path / "a")
    training.train_and_evaluate(tiny_config(num_steps=8, checkpoint_every=8), tmp_path / "b")
    a, b = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    assert int(a.step) == int(b.step) == 8
    jax.tree.map(np.testing.assert_array_equal, a, b)  # params, EMA, Adam, rng: bit for bit


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    training.train_and_evaluate(tiny_config(num_steps=2, checkpoint_every=2), tmp_path)
    good = final_state(tmp_path)
    real = input_pipeline.train_iterator
    poisoned = lambda *a, **k: (b * np.nan for b in real(*a, **k))  # e.g. corrupt images
    monkeypatch.setattr(input_pipeline, "train_iterator", poisoned)
    config = tiny_config(num_steps=12, checkpoint_every=4, log_every=100)
    with pytest.raises(training.Diverged, match=r"The last good checkpoint is step 2 in "):
        training.train_and_evaluate(config, tmp_path)
    after = final_state(tmp_path)
    assert int(after.step) == 2
    jax.tree.map(np.testing.assert_array_equal, after, good)


@pytest.mark.parametrize(
    "change, word",
    [
        (lambda c: c.training.update(batch_size=6), "batch_size"),
        (lambda c: c.data.update(image_size=7), "image_size"),
        (lambda c: c.data.update(dataset="cifar11"), "not a TFDS dataset"),
        (lambda c: c.diffusion.update(loss_type="hybrid"), "loss_type"),
    ],
)
def test_bad_config_fails_before_compiling(tmp_path, change, word):
    config = tiny_config()
    change(config)
    with pytest.raises(ValueError, match=word):
        training.Trainer(config, tmp_path)


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="not writable"):
        training.Trainer(tiny_config(), blocker / "workdir")


def test_sharding_helpers():
    mesh = sharding.make_mesh()
    batch = sharding.global_batch(np.arange(8 * 3, dtype=np.float32).reshape(8, 3), mesh)
    assert batch.shape == (8, 3) and len(batch.sharding.device_set) == 4
    assert [s.data.shape for s in batch.addressable_shards] == [(2, 3)] * 4
    np.testing.assert_array_equal(np.asarray(batch), np.arange(24).reshape(8, 3))
    assert sharding.per_process_batch_size(8) == 8
    x = jnp.ones(3)
    assert jax.device_put(x, sharding.replicated(mesh)).sharding.is_fully_replicated


def fixed_loss(trainer, params, x0):
    """The configured loss of params on x0 at every t with fixed ε: a noiseless measure."""
    sched, spec = trainer.setup.schedule, trainer.setup.diffusion
    T, n = sched.num_timesteps, x0.shape[0]
    t = jnp.repeat(jnp.arange(T), n)
    x0 = jnp.tile(jnp.asarray(x0), (T, 1, 1, 1))
    eps = jax.random.normal(jax.random.key(9), x0.shape)
    x_t = diffusion.q_sample(sched, x0, t, eps)
    params = jax.tree.map(np.asarray, params)  # on one device, as x0

    @jax.jit
    def loss(params):
        out = trainer.setup.model.apply({"params": params}, x_t, t)
        return jnp.mean(diffusion.training_losses(sched, spec, out, x0, x_t, t, eps))

    return float(loss(params))


@pytest.mark.parametrize(
    "settings, sampler",
    [
        (dict(var_type="learned_range", loss_type="hybrid"), "uniform"),
        (dict(var_type="learned_range", loss_type="kl"), "importance"),
        (dict(mean_type="v"), "uniform"),
        (dict(loss_type="l1"), "uniform"),
    ],
)
def test_each_objective_overfits_a_fixed_batch(tmp_path, settings, sampler):
    config = tiny_config(learning_rate=2e-3, warmup_steps=5, timestep_sampler=sampler)
    config.diffusion.update(settings)
    trainer = training.Trainer(config, tmp_path)
    state, batch = trainer.init(), fixed_batch(seed=1)
    x0 = sharding.global_batch(batch, trainer.mesh)
    before = fixed_loss(trainer, state.params, batch)
    for _ in range(100):
        state, metrics = trainer.train_step(state, x0)
    after = fixed_loss(trainer, state.params, batch)
    assert np.isfinite(float(metrics["loss"])) and after < 0.6 * before, (before, after)
    if sampler == "importance":  # 800 draws over T = 20: the history is full and in use
        assert int(state.history.counts.min()) == timesteps.HISTORY
        p = timesteps.probabilities(state.history)
        assert float(p.max() / p.min()) > 2


def test_resume_is_exact_with_the_importance_sampler(tmp_path):
    def config(num_steps, checkpoint_every):
        c = tiny_config(num_steps=num_steps, checkpoint_every=checkpoint_every)
        c.training.timestep_sampler = "importance"
        c.training.batch_size = 16
        c.diffusion.update(var_type="learned_range", loss_type="kl", num_timesteps=10)
        return c

    for steps, every, workdir in ((8, 8, "a"), (16, 8, "a"), (16, 16, "b")):
        training.train_and_evaluate(config(steps, every), tmp_path / workdir)
    a, b = (training.Trainer(config(16, 8), tmp_path / w).restore()[0] for w in "ab")
    assert int(a.step) == int(b.step) == 16
    # Warm after 100 draws (step 7): the second half drew t by importance.
    assert int(a.history.counts.min()) == timesteps.HISTORY
    jax.tree.map(np.testing.assert_array_equal, a, b)  # history included, bit for bit


def test_logged_metrics_are_the_means_of_the_steps_since_the_last_log():
    """The loop keeps each step's (loss, grad_norm) on the devices, replicated over four,
    and the log shows their means, fetched once."""
    mesh = sharding.make_mesh(jax.devices())
    put = lambda v: jax.device_put(jnp.float32(v), sharding.replicated(mesh))  # noqa: E731
    pending = [(put(1.0), put(10.0)), (put(2.0), put(30.0)), (put(4.5), put(2.0))]
    assert training.mean_metrics(pending) == pytest.approx((2.5, 14.0), rel=1e-7)
    assert np.isnan(training.mean_metrics([(put(np.nan), put(1.0))])[0])
