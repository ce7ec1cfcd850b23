"""Class-conditional models and classifier-free guidance (guidance.py and its callers)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mnist_data_dir, randomize
from PIL import Image

from ddpm_jax import (
    checkpointing,
    config_lib,
    guidance,
    input_pipeline,
    reverse,
    sampling,
    sharding,
    train_state,
    training,
    unet,
)
from ddpm_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
K = 10


def class_config(**training):
    config = config_lib.load_config("tiny")
    config.data.data_dir = str(mnist_data_dir())
    config.model.num_classes = K
    config.training.update(dict(dict(label_dropout=0.1, sample_every=0), **training))
    return config


def count(tree):
    return sum(math.prod(a.shape) for a in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def class_model():
    config = class_config()
    model = unet.UNet(config_lib.unet_config(config))
    x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
    params = randomize(jax.jit(model.init)(jax.random.key(0), x, t)["params"], seed=3)
    return config, model, params


def test_the_class_embedding_is_the_only_new_parameter(class_model):
    config, _, params = class_model
    plain = config.copy_and_resolve_references()
    plain.model.num_classes = 0
    model = unet.UNet(config_lib.unet_config(plain))
    x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
    base = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t))["params"]
    assert "label_emb" not in base
    assert params["label_emb"]["embedding"].shape == (K + 1, 4 * config.model.ch)  # + "none"
    assert count(params) - count(base) == (K + 1) * 4 * config.model.ch


def test_no_label_is_the_null_row(class_model):
    _, model, params = class_model
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    t = jnp.array([0, 7, 19])
    apply = lambda y: model.apply({"params": params}, x, t, y)
    np.testing.assert_array_equal(apply(None), apply(guidance.null_labels(3, K)))
    assert float(jnp.max(jnp.abs(apply(jnp.array([1, 2, 3])) - apply(None)))) > 1e-4
    with pytest.raises(ValueError, match="unconditional model"):
        unet.UNet(unet.UNetConfig(ch=32, ch_mult=(1,), attn_resolutions=(), out_ch=1)).init(
            jax.random.key(0), x, t, jnp.zeros(3, jnp.int32)
        )


def test_batched_guidance_equals_two_calls_combined(class_model):
    config, model, params = class_model
    spec = config_lib.diffusion_spec(config)
    apply = lambda x, t, y: model.apply({"params": params}, x, t, y)
    x = jax.random.normal(jax.random.key(2), (4, 8, 8, 1))
    t, y = jnp.array([3, 0, 19, 11]), jnp.array([7, 0, 9, 3])
    for w in (0.0, 3.0):
        got = guidance.guided_model_fn(apply, spec, y, w, K)(x, t)
        want = (1 + w) * apply(x, t, y) - w * apply(x, t, guidance.null_labels(4, K))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * (1 + w))


def test_unguided_sampling_runs_one_network_pass_and_guided_two():
    """w = None (guidance 0) applies the network once per step on the batch as it is; a
    guided step once on the doubled batch; an unconditional model once with no labels."""
    calls, spec = [], config_lib.diffusion_spec(config_lib.load_config("tiny"))
    apply = lambda x, t, y: calls.append((x.shape[0], y)) or x  # noqa: E731
    x, t, y = jnp.zeros((3, 2, 2, 1)), jnp.zeros((3,), jnp.int32), jnp.array([0, 1, 2])
    guidance.model_fn(apply, spec, y, None, 10)(x, t)
    assert len(calls) == 1 and calls[0][0] == 3 and calls[0][1] is y
    guidance.model_fn(apply, spec, y, 2.0, 10)(x, t)
    assert len(calls) == 2 and calls[1][0] == 6
    np.testing.assert_array_equal(calls[1][1], [0, 10, 1, 10, 2, 10])
    guidance.model_fn(apply, spec, None, None, 0)(x, t)
    assert calls[2] == (3, None)


def test_sample_fn_guidance_labels_devices_and_one_program(class_model):
    """w = 0 is the plain conditional model, labels=None the unconditional pass; 4 devices
    in chunks of 4 equal 1 device in one chunk; any labels share one program without
    guidance, and every w > 0 one other."""
    config, model, params = class_model
    config = config.copy_and_resolve_references()
    config.sampling.batch_size = 4
    setup = config_lib.build(config)
    sched, spec = setup.schedule, setup.diffusion
    rng, labels = jax.random.PRNGKey(4), np.array([3, 1, 4, 1, 5, 9])
    keys = reverse.example_keys(rng, 6)
    x_T = reverse.initial_noise(keys, (8, 8, 1), 20)
    apply = lambda y: lambda x, t: model.apply({"params": params}, x, t, y)  # noqa: E731
    on_four = sampling.make_sample_fn(setup)
    got = on_four(params, rng, 6, output="float", labels=labels, guidance=0.0)
    want = reverse.sample_loop(sched, spec, apply(jnp.asarray(labels)), x_T, keys)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    got = on_four(params, rng, 6, output="float")
    want = reverse.sample_loop(sched, spec, apply(None), x_T, keys)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    guided = on_four(params, rng, 6, output="float", labels=labels, guidance=3.0)
    assert float(np.max(np.abs(guided - got))) > 1e-3
    assert on_four.segment._cache_size() == 2  # labels and None at w = 0; w = 3
    on_four(params, rng, 6, output="float", labels=labels[::-1], guidance=0.5)
    assert on_four.segment._cache_size() == 2  # another w and other labels: no new program
    config.sampling.batch_size = 6
    on_one = sampling.make_sample_fn(config, devices=jax.devices()[:1])
    one = on_one(params, rng, 6, output="float", labels=labels, guidance=3.0)
    np.testing.assert_allclose(one, guided, rtol=1e-4, atol=1e-5)
    # Sample i depends on (rng, i, its label, w) alone: the first three of a shorter call.
    three = on_one(params, rng, 3, output="float", labels=labels[:3], guidance=3.0)
    np.testing.assert_allclose(three, guided[:3], rtol=1e-4, atol=1e-5)


def test_guidance_through_a_solver_is_the_formula_on_two_calls(class_model):
    """config.sampling.method = unipc3: sample_fn with labels and w equals solvers.solve on
    ε̃ = (1 + w) ε(x, t, y) - w ε(x, t, ∅), the two network calls made separately."""
    from ddpm_jax import solvers

    config, model, params = class_model
    config = config.copy_and_resolve_references()
    config.sampling.update(method="unipc3", num_steps=5, batch_size=4)
    setup, w = config_lib.build(config), 2.0
    rng, labels = jax.random.PRNGKey(6), np.array([2, 7, 0, 7])
    got = sampling.make_sample_fn(setup)(params, rng, 4, "float", labels, guidance=w)
    apply = lambda x, t, y: model.apply({"params": params}, x, t, y)  # noqa: E731
    null = guidance.null_labels(4, K)
    eps = lambda x, t: (1 + w) * apply(x, t, jnp.asarray(labels)) - w * apply(x, t, null)  # noqa: E731
    x_T = reverse.initial_noise(reverse.example_keys(rng, 4), (8, 8, 1), 5)
    ts = solvers.spaced_timesteps(20, 5)
    want = solvers.solve(setup.schedule, setup.diffusion, eps, x_T, ts, "unipc3")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    conditional = lambda x, t: apply(x, t, jnp.asarray(labels))  # noqa: E731
    plain = solvers.solve(setup.schedule, setup.diffusion, conditional, x_T, ts, "unipc3")
    assert float(np.max(np.abs(got - plain))) > 1e-3  # w does something


def test_bad_labels_and_guidance_are_refused(class_model, tiny_model):
    config, _, params = class_model
    sample_fn = sampling.make_sample_fn(config)
    rng = jax.random.PRNGKey(0)
    for labels, guid, word in (
        ([1, 2], None, "labels must be 3 integers"),
        ([1, 2, 10], None, r"labels must lie in \[0, 9\], got \[10\]$"),
        (None, 2.0, "guidance needs labels"),
        ([1, 2, 3], -1.0, "guidance must be >= 0"),
    ):
        with pytest.raises(UserError, match=word):
            sample_fn(params, rng, 3, labels=labels, guidance=guid)
    plain_config, _, plain_params = tiny_model
    with pytest.raises(UserError, match="unconditional"):
        sampling.make_sample_fn(plain_config)(plain_params, rng, 3, labels=[1, 2, 3])
    for setting, word in (
        ("training.label_dropout", "label_dropout"),
        ("sampling.guidance", "guidance"),
    ):
        bad = config_lib.load_config("tiny")
        group, name = setting.split(".")
        bad[group][name] = 0.5
        with pytest.raises(UserError, match=word):
            config_lib.build(bad, 4)


def test_the_null_row_is_used_exactly_when_a_label_is_dropped(tmp_path):
    """One update: the embedding rows that move are those of the labels the network saw,
    "no label" included exactly when some were dropped (counted by the step's metric)."""
    config = class_config(label_dropout=0.5, warmup_steps=0, batch_size=16)
    trainer = training.Trainer(config, tmp_path)
    state = trainer.init()
    state = state.replace(params=randomize(state.params))  # the zero output layer hides y
    before = np.array(state.params["label_emb"]["embedding"])
    x0, y = next(input_pipeline.train_iterator(config, 16, seed=0))
    step_rng = jax.random.fold_in(state.rng, state.step)
    seen = train_state.drop_labels(jax.random.fold_in(step_rng, 3), jnp.asarray(y), 0.5, K)
    state, metrics = trainer.train_step(state, sharding.global_batch((x0, y), trainer.mesh))
    moved = np.flatnonzero(np.any(np.asarray(state.params["label_emb"]["embedding"]) != before, 1))
    dropped = int(np.sum(np.asarray(seen) == K))
    assert int(metrics["labels_dropped"]) == dropped and 0 < dropped < 16
    np.testing.assert_array_equal(moved, np.unique(np.asarray(seen)))
    assert K in moved
    counts = [
        int(np.sum(train_state.drop_labels(jax.random.key(s), jnp.asarray(y), 0.1, K) == K))
        for s in range(200)
    ]
    np.testing.assert_allclose(np.mean(counts) / 16, 0.1, atol=0.015)  # P(drop) = label_dropout
    assert int(np.sum(train_state.drop_labels(jax.random.key(0), jnp.asarray(y), 0.0, K) == K)) == 0


def test_labels_from_tfds_and_from_image_folders(tmp_path):
    config = class_config()
    x0, y = next(input_pipeline.train_iterator(config, 8, seed=0))
    plain = config.copy_and_resolve_references()
    plain.model.num_classes = 0
    np.testing.assert_array_equal(x0, next(input_pipeline.train_iterator(plain, 8, seed=0)))
    assert y.dtype == np.int32 and y.shape == (8,) and 0 <= y.min() and y.max() < K
    batch = next(input_pipeline.eval_dataset(config, 4)[0].as_numpy_iterator())
    assert len(batch) == 4 and batch[3].dtype == np.int32  # images, mask, index, labels
    rng = np.random.default_rng(0)
    for i in range(6):  # label = subfolder; the image's brightness tells which it was
        folder = tmp_path / "train" / ["cats", "dogs", "owls"][i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        image = np.full((8, 8, 3), 40 * (i % 3), np.uint8) + rng.integers(0, 5, (8, 8, 3), np.uint8)
        Image.fromarray(image).save(folder / f"{i}.png")
    config.data.update(dataset=f"folder:{tmp_path}", shuffle_buffer=10, random_flip=False)
    config.data.num_channels = 3
    config.model.num_classes = 3
    x0, y = next(input_pipeline.train_iterator(config, 6, seed=0))
    level = np.round((x0.mean(axis=(1, 2, 3)) + 1) * 127.5 / 40).astype(int)
    np.testing.assert_array_equal(y, level)
    config.model.num_classes = 2
    with pytest.raises(UserError, match="has 3 classes; set --config.model.num_classes=3"):
        input_pipeline.check_dataset(config, "train")


def test_train_sample_and_evaluate_a_class_model(tmp_path):
    """train.py, sample.py --labels --guidance (a row per label) and evaluate.py (the
    conditional bound) end to end on the tiny config with 10 classes."""
    overrides = [f"--config.data.data_dir={mnist_data_dir()}", "--config.model.num_classes=10"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    common = ["--config", "tiny", "--workdir", str(tmp_path), *overrides]

    def run(script, *args):
        cmd = [sys.executable, str(ROOT / script), *common, *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    run("train.py", "--config.training.num_steps=2", "--config.training.label_dropout=0.1",
        "--config.training.sample_every=2", "--config.eval.every=0")  # fmt: skip
    grid = np.asarray(Image.open(tmp_path / "samples" / "step_00000002.png"))
    assert grid.shape == (8, 32)  # 4 samples: the classes 0, 1, 2, 3 in one row
    said = run(
        "sample.py", "--labels=0,7", "--num_samples=3", "--guidance=2", f"--out={tmp_path / 's'}"
    )
    assert f"wrote 6 samples of the EMA weights of step 2 in {tmp_path} to " in said.stdout
    saved = np.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(saved["labels"], [0, 0, 0, 7, 7, 7])
    assert np.asarray(Image.open(tmp_path / "s.png")).shape == (16, 24)  # 2 rows of 3
    run("evaluate.py", "--eval=nll", "--batch_size=4", "--max_batches=1")
    summary = json.loads((tmp_path / "eval" / "step_2.json").read_text())
    assert summary["num_examples"] == 4 and summary["bpd"] > 0
    assert checkpointing.steps(tmp_path) == [2]
