"""Checkpoints written before the typed setup (config_lib.build) restore, resume and sample
bit-identically: tests/data/v1_checkpoint and what the code of its time computed from it
(tests/data/v1_reference.npz, both written by tests/fixtures/make_v1_checkpoint.py)."""

import hashlib
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from ddpm_jax import checkpointing, config_lib, sampling, sharding, train_state
from ddpm_jax.spec import SamplerMethod

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="module")
def v1():
    """The config the v1 checkpoint was written with, as its record keeps it whole, and the
    reference outputs."""
    record = json.loads(
        (DATA / "v1_checkpoint" / "checkpoints" / "2" / "record" / "metadata").read_text()
    )
    config = ml_collections.ConfigDict(record["config"])
    return config, dict(np.load(DATA / "v1_reference.npz"))


def digest(tree):
    """sha256 of every leaf's bytes in path order (as the fixture script computes it)."""
    h = hashlib.sha256()
    for path, leaf in sorted(traverse_util.flatten_dict(tree).items()):
        h.update("/".join(path).encode() + np.asarray(leaf).tobytes())
    return h.hexdigest()


def test_v1_checkpoint_resumes_to_the_same_next_step(v1, tmp_path):
    """The whole train state restores into today's state, and one more step from it gives
    the parameters, EMA and metrics the code that wrote it gave."""
    config, ref = v1
    workdir = tmp_path / "run"
    shutil.copytree(DATA / "v1_checkpoint", workdir)
    setup, mesh = config_lib.build(config, 4), sharding.make_mesh()
    tx = train_state.make_optimizer(setup.training)
    abstract = jax.eval_shape(train_state.jit_init_state(setup, tx, mesh))
    target = checkpointing.with_shardings(abstract, train_state.state_shardings(abstract, mesh))
    state, step = checkpointing.restore(workdir, target, config)
    assert step == 2
    x0 = jax.random.uniform(jax.random.key(7), (8, 8, 8, 1), minval=-1.0, maxval=1.0)
    labels = jnp.arange(8, dtype=jnp.int32) % 3
    batch = sharding.global_batch((np.asarray(x0), np.asarray(labels)), mesh)
    state, metrics = train_state.jit_train_step(setup, tx, mesh, abstract)(state, batch)
    assert digest(state.params) == ref["step3_params"]
    assert digest(state.ema_params) == ref["step3_ema"]
    for name, value in metrics.items():
        np.testing.assert_array_equal(np.asarray(value), ref[f"step3_{name}"])


def test_v1_checkpoint_samples_the_same_images(v1):
    """EMA samples from the v1 checkpoint: ancestral (unconditional, then labelled with
    guidance) and DDIM on a respaced chain, equal to the bit."""
    config, ref = v1
    params, step = checkpointing.restore_params(DATA / "v1_checkpoint", config)
    assert step == 2
    setup, rng = config_lib.build(config), jax.random.PRNGKey(0)
    sample_fn = sampling.make_sample_fn(setup)
    np.testing.assert_array_equal(sample_fn(params, rng, 4, output="float"), ref["ancestral"])
    guided = sample_fn(params, rng, 4, output="float", labels=[0, 1, 2, 0], guidance=1.5)
    np.testing.assert_array_equal(guided, ref["guided"])
    config.sampling.method, config.sampling.num_steps, config.sampling.eta = "ddim", 5, 0.0
    ddim = config_lib.build(config)
    assert ddim.sampler.method == SamplerMethod.DDIM and ddim.respaced
    np.testing.assert_array_equal(sampling.make_sample_fn(ddim)(params, rng, 4), ref["ddim_uint8"])
