"""The U-Net: parameter counts of the paper's models, layer semantics, dtypes, dropout."""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize
from flax import traverse_util

from ddpm_jax import unet

TINY = unet.UNetConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1)


def param_shapes(config, size):
    model = unet.UNet(config)
    x, t = jnp.zeros((1, size, size, config.out_ch)), jnp.zeros((1,), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, t))["params"]


def count(tree):
    return sum(math.prod(a.shape) for a in jax.tree.leaves(tree))


def test_paper_parameter_counts():
    assert count(param_shapes(unet.UNetConfig(), 32)) == 35_746_307  # CIFAR10
    config_256 = unet.UNetConfig(ch_mult=(1, 1, 2, 2, 4, 4), dropout=0.0)
    assert count(param_shapes(config_256, 256)) == 113_673_219  # CelebA-HQ, LSUN


def test_cifar_structure():
    """Blocks per level, attention only at 16x16, channel widths, shortcuts where widths change."""
    p = param_shapes(unet.UNetConfig(), 32)
    assert sorted(p) == ["conv_in", "conv_out", "down_0", "down_1", "down_2", "down_3", "mid",
                         "norm_out", "temb", "up_0", "up_1", "up_2", "up_3"]  # fmt: skip
    assert sorted(p["down_1"]) == ["attn_0", "attn_1", "block_0", "block_1", "downsample"]
    assert (
        sorted(p["down_0"]) == ["block_0", "block_1", "downsample"]
        and "downsample" not in p["down_3"]
    )
    assert sorted(p["up_1"]) == [
        "attn_0",
        "attn_1",
        "attn_2",
        "block_0",
        "block_1",
        "block_2",
        "upsample",
    ]
    assert "upsample" not in p["up_0"] and sorted(p["mid"]) == ["attn_1", "block_1", "block_2"]
    assert p["down_1"]["block_0"]["nin_shortcut"]["kernel"].shape == (128, 256)
    assert p["up_0"]["block_0"]["conv1"]["kernel"].shape == (3, 3, 256 + 128, 128)
    assert p["temb"]["dense0"]["kernel"].shape == (128, 512)
    assert p["conv_out"]["kernel"].shape == (3, 3, 128, 3)
    shortcuts = [
        k for k in traverse_util.flatten_dict(p) if "nin_shortcut" in k and k[-1] == "kernel"
    ]
    assert len(shortcuts) == 1 + 12  # down_1/block_0, and every up block (concatenated skips)


def test_timestep_embedding_matches_formula():
    t = np.array([0, 1, 17, 999])
    got = np.asarray(unet.timestep_embedding(jnp.asarray(t), 10))
    freqs = np.exp(-np.log(10000.0) * np.arange(5) / 4)
    np.testing.assert_allclose(
        got, np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], 1), atol=1e-4
    )
    assert unet.timestep_embedding(jnp.asarray(t), 11).shape == (4, 11)
    # diffusers' flip_sin_to_cos and freq_shift: [cos, sin], f_i = exp(-ln(1e4) i / (5 - 0))
    got = np.asarray(unet.timestep_embedding(jnp.asarray(t), 10, flip=True, shift=0.0))
    freqs = np.exp(-np.log(10000.0) * np.arange(5) / 5)
    want = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], 1)
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.fixture(scope="module")
def tiny():
    model = unet.UNet(TINY)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    t = jnp.array([3, 900])
    params = jax.jit(model.init)(jax.random.key(0), x, t)["params"]
    return model, params, x, t


def test_fresh_model_outputs_exactly_zero(tiny):
    model, params, x, t = tiny
    out = jax.jit(model.apply)({"params": params}, x, t)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out))) == 0.0
    zero = [
        k
        for k, v in traverse_util.flatten_dict(params).items()
        if k[-1] == "kernel" and not v.any()
    ]
    assert {k[-2] for k in zero} == {"conv2", "proj_out", "conv_out"}


def test_output_shape_finite_and_jit_equals_eager(tiny):
    model, params, x, t = tiny
    params = randomize(params)
    apply = jax.jit(model.apply)
    eager = model.apply({"params": params}, x, t)
    jitted = apply({"params": params}, x, t)
    assert eager.shape == (2, 8, 8, 3) and bool(jnp.all(jnp.isfinite(eager)))
    np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-5)
    # The output depends on t (through the embedding) and on each example only.
    other_t = apply({"params": params}, x, t[::-1])
    assert float(jnp.max(jnp.abs(other_t - jitted))) > 1e-3
    single = apply({"params": params}, x[:1], t[:1])
    np.testing.assert_allclose(single, jitted[:1], rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training(tiny):
    model, params, x, t = tiny
    params = randomize(params)
    apply = jax.jit(
        lambda train, rng: model.apply({"params": params}, x, t, train=train, rngs=rng),
        static_argnums=0,
    )
    np.testing.assert_array_equal(apply(False, None), apply(False, {"dropout": jax.random.key(1)}))
    a, b = apply(True, {"dropout": jax.random.key(1)}), apply(True, {"dropout": jax.random.key(2)})
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    np.testing.assert_array_equal(a, apply(True, {"dropout": jax.random.key(1)}))
    with pytest.raises(Exception, match="dropout"):
        apply(True, None)


def test_bfloat16_path_is_close_to_float32(tiny):
    model, params, x, t = tiny
    params = randomize(params)
    bf16 = unet.UNet(unet.UNetConfig(**{**TINY.__dict__, "dtype": "bfloat16"}))
    ref = jax.jit(model.apply)({"params": params}, x, t)
    out = jax.jit(bf16.apply)({"params": params}, x, t)
    assert out.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert 0 < rel < 0.05, rel
    # Parameters stay float32 whatever the computation dtype.
    init = jax.eval_shape(bf16.init, jax.random.key(0), x, t)["params"]
    assert {a.dtype for a in jax.tree.leaves(init)} == {jnp.dtype(jnp.float32)}


def test_resampling_matches_tensorflow():
    """Down: TF 'SAME' stride-2 conv (pads bottom/right only); up: nearest neighbour + conv."""
    tf = pytest.importorskip("tensorflow")
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 32)).astype(np.float32)
    for up in (False, True):
        block = unet.Resample(jnp.float32, up=up, with_conv=True)
        params = randomize(block.init(jax.random.key(0), jnp.asarray(x))["params"])
        w, b = np.asarray(params["conv"]["kernel"]), np.asarray(params["conv"]["bias"])
        inp = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2) if up else x
        want = tf.nn.conv2d(inp, w, strides=1 if up else 2, padding="SAME").numpy() + b
        np.testing.assert_allclose(block.apply({"params": params}, jnp.asarray(x)), want, atol=1e-4)


@pytest.mark.parametrize("heads", [1, 4])
def test_attention_matches_restatement(heads):
    """Heads of d = C / heads channels: softmax(q_h k_h^T / √d) v_h, concatenated."""
    x = np.random.default_rng(1).standard_normal((2, 4, 4, 32)).astype(np.float32)
    config = unet.UNetConfig(ch=32, ch_mult=(1,), attn_head_dim=32 // heads if heads > 1 else 0)
    block = unet.AttnBlock(jnp.float32, config=config)
    p = randomize(block.init(jax.random.key(0), jnp.asarray(x))["params"])
    get = lambda name: (np.asarray(p[name]["kernel"]), np.asarray(p[name]["bias"]))
    # GroupNorm(32 groups) on 32 channels: each channel normalised over H, W.
    mu, var = x.mean((1, 2), keepdims=True), x.var((1, 2), keepdims=True)
    h = (x - mu) / np.sqrt(var + 1e-6) * np.asarray(p["norm"]["scale"]) + np.asarray(
        p["norm"]["bias"]
    )
    d = 32 // heads
    q, k, v = ((h @ w + b).reshape(2, 16, heads, d) for w, b in map(get, "qkv"))
    w = np.einsum("bihc,bjhc->bhij", q, k) / np.sqrt(d)
    w = np.exp(w - w.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    mixed = np.einsum("bhij,bjhc->bihc", w, v).reshape(2, 16, 32)
    out = (mixed @ get("proj_out")[0] + get("proj_out")[1]).reshape(x.shape)
    np.testing.assert_allclose(block.apply({"params": p}, jnp.asarray(x)), x + out, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, word",
    [(dict(ch=48), "ch"), (dict(ch_mult=()), "ch_mult"), (dict(num_res_blocks=0), "num_res_blocks"),
     (dict(dropout=1.0), "dropout"), (dict(dtype="float16"), "dtype"),
     (dict(precision="fast"), "precision"), (dict(ch=32, norm_groups=24), "norm_groups"),
     (dict(attn_head_dim=48), "attn_head_dim"), (dict(downsample_pad="valid"), "downsample_pad"),
     (dict(mid_attn_groups=3), "mid_attn_groups"), (dict(norm_eps=0.0), "norm_eps")],
)  # fmt: skip
def test_bad_config(kwargs, word):
    with pytest.raises(ValueError, match=word):
        unet.UNetConfig(**kwargs)


def matmul_precisions(config):
    """The precision of every convolution and dot of the network's program, lowered where
    the platform default is bf16 passes."""
    model, x, t = unet.UNet(config), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t))
    with jax.default_matmul_precision("bfloat16"):
        text = jax.jit(lambda p: model.apply(p, x, t)).lower(params).as_text()
    ops = [
        line
        for line in text.splitlines()
        if "stablehlo.convolution" in line or "dot_general" in line
    ]
    return [
        re.search(r"precision(?:_config)? = \[(?:#stablehlo<precision )?(\w+)", line)[1]
        for line in ops
    ]


def test_precision_reaches_every_convolution_and_matmul():
    highest = matmul_precisions(dataclasses.replace(TINY, precision="highest"))
    default = matmul_precisions(TINY)
    flat = traverse_util.flatten_dict(param_shapes(TINY, 8))
    kernels = sum(path[-1] == "kernel" for path in flat)  # one op per conv or dense layer
    attention = sum(path[-2:] == ("q", "kernel") for path in flat)  # and two matmuls each
    assert len(highest) == len(default) == kernels + 2 * attention
    assert set(highest) == {"HIGHEST"} and set(default) == {"DEFAULT"}


def test_bad_image_size():
    model = unet.UNet(unet.UNetConfig(ch=32, ch_mult=(1, 2, 2)))
    with pytest.raises(ValueError, match="divisible by 4"):
        model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 3)), jnp.zeros((1,), jnp.int32))


def test_apply_in_chunks_equals_whole_batch(tiny):
    model, params, _, _ = tiny
    params = randomize(params)
    x = jax.random.normal(jax.random.key(3), (8, 8, 8, 3))
    t = jnp.arange(8) * 100
    fn = lambda x, t: model.apply({"params": params}, x, t)
    whole = jax.jit(fn)(x, t)
    chunked = jax.jit(lambda x, t: unet.apply_in_chunks(fn, 2, x, t))(x, t)
    np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-5)  # float32 summation order
    with pytest.raises(ValueError, match="divisible by chunk_size 3"):
        unet.apply_in_chunks(fn, 3, x, t)
