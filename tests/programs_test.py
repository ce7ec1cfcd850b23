"""programs.CachedJit: the same numbers as jax.jit, programs kept across launches (a fresh
instance loads without tracing), a key for everything the program depends on, and a
damaged file traced again."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from training_test import tiny_config

from ddpm_jax import config_lib, programs, sharding, train_state, training


@pytest.fixture
def kept(tmp_path, monkeypatch):
    """Programs kept in tmp_path/programs."""
    directory = epath.Path(tmp_path) / "programs"
    monkeypatch.setattr(programs, "cache_dir", lambda: directory)
    return directory


def step(state, batch, *, scale, traces):
    """A small stand-in for a train step: a tree in, a tree out, an absent leaf (None)."""
    traces.append(1)
    w, b = state["w"], state["b"]
    y = jnp.tanh(batch["x"] @ w + b) * scale
    new = dict(w=w - 0.1 * batch["x"].T @ y, b=b - 0.1 * y.sum(0), unused=None)
    return new, dict(loss=jnp.mean(y**2), n=jnp.int32(batch["x"].shape[0]))


def make(scale, traces, mesh):
    replicated, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    fn = functools.partial(step, scale=scale, traces=traces)
    kwargs = dict(in_shardings=(replicated, batch), out_shardings=(replicated, replicated))
    return fn, kwargs


def arguments(mesh, seed=0, rows=8):
    rng = np.random.default_rng(seed)
    state = dict(w=rng.normal(size=(3, 2)), b=rng.normal(size=(2,)), unused=None)
    state = jax.device_put(jax.tree.map(np.float32, state), sharding.replicated(mesh))
    x = np.float32(rng.normal(size=(rows, 3)))
    return state, dict(x=jax.device_put(x, sharding.batch_sharding(mesh)))


def test_equals_jax_jit_and_the_next_launch_does_not_trace(kept):
    mesh = sharding.make_mesh()
    traces = []
    fn, kwargs = make(2.0, traces, mesh)
    expected = jax.jit(fn, **kwargs)(*arguments(mesh))
    first = programs.CachedJit(fn, "step", 2.0, **kwargs)(*arguments(mesh))
    assert len(traces) == 2  # jax.jit's, then the export's
    later, again = [], programs.CachedJit(make(2.0, [], mesh)[0], "step", 2.0, **kwargs)
    again.fn = functools.partial(step, scale=2.0, traces=later)
    second = again(*arguments(mesh))
    assert later == []  # a relaunch: loaded, not traced
    for out in (first, second):
        assert jax.tree.structure(out) == jax.tree.structure(expected)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected), strict=True):
            np.testing.assert_array_equal(a, b)
            assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
    assert len(list(kept.iterdir())) == 1


def test_a_program_per_setting_and_signature(kept):
    mesh = sharding.make_mesh()
    fn, kwargs = make(2.0, [], mesh)
    programs.CachedJit(fn, "step", 2.0, **kwargs)(*arguments(mesh))
    programs.CachedJit(make(3.0, [], mesh)[0], "step", 3.0, **kwargs)(*arguments(mesh))
    other = programs.CachedJit(fn, "step", 2.0, **kwargs)
    out = other(*arguments(mesh, rows=4))  # another batch shape
    np.testing.assert_allclose(out[1]["n"], 4)
    assert len(list(kept.iterdir())) == 3
    with jax.default_matmul_precision("bfloat16"):  # a setting that changes the trace
        other(*arguments(mesh))
    assert len(list(kept.iterdir())) == 4


def test_a_damaged_file_is_traced_again_and_replaced(kept):
    mesh = sharding.make_mesh()
    fn, kwargs = make(2.0, [], mesh)
    expected = programs.CachedJit(fn, "step", 2.0, **kwargs)(*arguments(mesh))
    (path,) = kept.iterdir()
    path.write_bytes(b"not a program")
    traces = []
    again = programs.CachedJit(make(2.0, traces, mesh)[0], "step", 2.0, **kwargs)
    out = again(*arguments(mesh))
    assert traces  # traced again
    np.testing.assert_array_equal(out[1]["loss"], expected[1]["loss"])
    assert path.read_bytes() != b"not a program"


def test_without_a_cache_it_is_jax_jit(monkeypatch):
    monkeypatch.setattr(programs, "cache_dir", lambda: None)
    mesh, traces = sharding.make_mesh(), []
    fn, kwargs = make(2.0, traces, mesh)
    cached = programs.CachedJit(fn, "step", 2.0, **kwargs)
    assert cached.warm(*arguments(mesh)) is None
    cached(*arguments(mesh))
    cached(*arguments(mesh, seed=1))
    assert len(traces) == 1 and cached._cache_size() == 1


def test_fingerprint_sees_every_element_and_field():
    a = np.zeros(5000, np.float32)
    b = a.copy()
    b[2500] = 1.0  # beyond what a repr shows
    assert programs.fingerprint(a).digest() != programs.fingerprint(b).digest()
    setup = config_lib.build(tiny_config())
    changed = tiny_config()
    changed.diffusion.beta_end = 0.1
    other = config_lib.build(changed)
    same = config_lib.build(tiny_config())
    assert programs.fingerprint(setup).digest() == programs.fingerprint(same).digest()
    assert programs.fingerprint(setup).digest() != programs.fingerprint(other).digest()
    with pytest.raises(TypeError, match="cannot hash"):
        programs.fingerprint(object())


def test_the_kept_train_step_equals_the_traced_one(kept, tmp_path):
    config = tiny_config()
    config.model.update(ch_mult=(1,), attn_resolutions=())  # one level: a quicker compile
    trainer = training.Trainer(config, tmp_path / "run")
    assert isinstance(trainer.train_step, programs.CachedJit)
    plain = train_state.jit_train_step(
        trainer.setup, trainer.tx, trainer.mesh, trainer.abstract_state
    )
    rng = np.random.default_rng(0)
    batch = np.float32(rng.uniform(-1, 1, (8, *trainer.setup.image_shape)))
    batch = sharding.global_batch(batch, trainer.mesh)
    trainer.compile_step().result()  # (from the abstract state, as the loop does)
    assert trainer.train_step._cache_size() == 1
    kept_state, kept_metrics = trainer.train_step(trainer.init(), batch)
    state, metrics = plain(trainer.init(), batch)
    for a, b in zip(jax.tree.leaves(kept_state), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    for name in metrics:
        np.testing.assert_array_equal(kept_metrics[name], metrics[name])
    assert trainer.train_step._cache_size() == 1  # the same program as compiled ahead
    assert [p.name.split("-")[0] for p in kept.iterdir()] == ["train_step"]
