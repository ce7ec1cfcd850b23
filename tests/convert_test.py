"""The TF checkpoint converter: round trip through a real TF checkpoint, and its errors."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from flax import traverse_util

from ddpm_jax import convert, unet

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

CONFIG = unet.UNetConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))


@pytest.fixture(scope="module")
def params():
    model = unet.UNet(CONFIG)
    init = jax.jit(model.init)(
        jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32)
    )
    return jax.tree.map(np.asarray, init["params"])


def write_tf_checkpoint(path, tensors):
    """A TF checkpoint with exactly these {name: array} variables (as tf.train.Saver writes)."""
    names = sorted(tensors)
    tf.raw_ops.SaveV2(
        prefix=str(path),
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=[tf.constant(tensors[n]) for n in names],
    )
    return str(path)


def authors_layout(params, scale=1.0):
    """The variables of a checkpoint of the authors' training run: raw, EMA and Adam slots."""
    out = {"global_step": np.int64(1000), "beta1_power": np.float32(0.9)}
    for path, value in traverse_util.flatten_dict(params).items():
        name = "model/" + convert.tf_variable_name(path)
        out[name] = value
        out[name + convert.EMA_SUFFIX] = value * scale
        out[name + "/Adam"] = np.zeros_like(value)
        out[name + "/Adam_1"] = np.zeros_like(value)
    return out


def test_variable_names_follow_the_authors_scopes():
    assert (
        convert.tf_variable_name(("down_0", "block_0", "norm1", "scale"))
        == "down_0/block_0/norm1/gamma"
    )
    assert convert.tf_variable_name(("mid", "attn_1", "q", "bias")) == "mid/attn_1/q/b"
    assert convert.tf_variable_name(("temb", "dense0", "kernel")) == "temb/dense0/W"
    assert convert.tf_variable_name(("norm_out", "bias")) == "norm_out/beta"


@pytest.mark.parametrize("ema", [True, False])
def test_round_trip(tmp_path, params, ema):
    path = write_tf_checkpoint(tmp_path / "model.ckpt-10", authors_layout(params, scale=2.0))
    loaded = convert.load_tf_checkpoint(path, params, ema=ema)
    factor = 2.0 if ema else 1.0
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, factor * b), loaded, params)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    assert all(a.dtype == np.float32 for a in jax.tree.leaves(loaded))


def test_missing_unexpected_and_misshaped_are_named(tmp_path, params):
    tensors = authors_layout(params)
    del tensors["model/mid/attn_1/q/W" + convert.EMA_SUFFIX]
    tensors["model/down_0/block_0/conv1/W" + convert.EMA_SUFFIX] = np.zeros(
        (3, 3, 32, 7), np.float32
    )
    tensors["model/down_9/block_0/conv1/W" + convert.EMA_SUFFIX] = np.zeros((1,), np.float32)
    path = write_tf_checkpoint(tmp_path / "bad.ckpt", tensors)
    with pytest.raises(ValueError) as err:
        convert.load_tf_checkpoint(path, params)
    msg = str(err.value)
    assert "missing: model/mid/attn_1/q/W" in msg
    assert "unexpected: model/down_9/block_0/conv1/W/ExponentialMovingAverage" in msg
    assert "wrong shape: model/down_0/block_0/conv1/W/ExponentialMovingAverage" in msg
    assert "(3, 3, 32, 7)" in msg and "(3, 3, 32, 32)" in msg


def test_other_config_is_refused(tmp_path, params):
    """A checkpoint of a different architecture fails with a list, not a half-loaded model."""
    path = write_tf_checkpoint(tmp_path / "m.ckpt", authors_layout(params))
    bigger = unet.UNet(
        unet.UNetConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(4,))
    )
    x, t = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32)
    expected = jax.eval_shape(bigger.init, jax.random.key(0), x, t)["params"]
    with pytest.raises(ValueError, match="missing: model/down_2/block_0"):
        convert.load_tf_checkpoint(path, expected)


def test_not_a_checkpoint(tmp_path, params):
    (tmp_path / "junk.index").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read a TensorFlow checkpoint"):
        convert.load_tf_checkpoint(str(tmp_path / "junk"), params)


def tiny_tf_checkpoint(directory):
    """(checkpoint prefix, its EMA params): an authors'-layout checkpoint of configs/tiny.py."""
    from ddpm_jax import config_lib

    expected = convert.expected_params(
        config_lib.build(config_lib.load_config(CONFIGS / "tiny.py"))
    )
    params = jax.tree.map(
        lambda s: np.random.default_rng(s.size).standard_normal(s.shape).astype(np.float32),
        expected,
    )
    return write_tf_checkpoint(directory / "model.ckpt-5", authors_layout(params)), params


def test_command_writes_orbax_params(tmp_path):
    import orbax.checkpoint as ocp

    config_path = CONFIGS / "tiny.py"
    ckpt, params = tiny_tf_checkpoint(tmp_path)
    out = tmp_path / "params"
    convert.main(["--checkpoint", ckpt, "--config", str(config_path), "--out", str(out)])
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(out)
    jax.tree.map(np.testing.assert_array_equal, restored, params)
    with pytest.raises(SystemExit):  # never overwrite an existing directory
        convert.main(["--checkpoint", ckpt, "--config", str(config_path), "--out", str(out)])
