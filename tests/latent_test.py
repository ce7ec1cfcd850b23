"""Latent diffusion end to end on tiny configs: a first stage trained by train.py's loop
(exact resume, with its discriminator), a DDPM on its latents (exact resume, the scale of
the first batch), sampling and evaluation decoded, a diffusers AutoencoderKL as the first
stage, and the refusals."""

import dataclasses
import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fid_file, mnist_data_dir

from ddpm_jax import (
    autoencoder,
    autoencoder_training,
    config_lib,
    convert,
    eval_modes,
    first_stage,
    input_pipeline,
    sampling,
    sharding,
    training,
)
from ddpm_jax.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from autoencoder_test import write_vae  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REFERENCES = ROOT / "tests" / "data" / "diffusers_references.npz"


def ae_config(**training_settings):
    """mnist_autoencoder shrunk: 8x8 digits, f = 2, 4x4x2 latents, the discriminator on
    from step 3."""
    config = config_lib.load_config("mnist_autoencoder")
    config.data.data_dir = str(mnist_data_dir())
    config.data.image_size = 8
    config.model.update(ch=8, ch_mult=(1, 2), norm_groups=4, z_channels=2)
    config.loss.update(disc_weight=0.5, disc_start=3, disc_layers=1, disc_ch=8)
    config.training.update(batch_size=8, num_steps=4, warmup_steps=2, log_every=2,
                           checkpoint_every=2, sample_every=4, num_sample_images=4)  # fmt: skip
    config.training.update(training_settings)
    config.eval.update(batch_size=8, every=4, psnr_batches=1)
    return config


def latent_config(ae_workdir, **training_settings):
    """mnist_latent shrunk onto ae_config's 4x4x2 latents, T = 20."""
    config = config_lib.load_config("mnist_latent")
    config.data.data_dir = str(mnist_data_dir())
    config.data.image_size = 8
    config.autoencoder.update(path=str(ae_workdir), latent_size=4, latent_channels=2)
    config.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(2,))
    config.diffusion.update(num_timesteps=20, beta_end=0.2)
    config.training.update(batch_size=8, num_steps=4, warmup_steps=2, log_every=2,
                           checkpoint_every=2, sample_every=0)  # fmt: skip
    config.training.update(training_settings)
    config.sampling.batch_size = 4
    config.eval.update(batch_size=8, every=0, nll_batches=1, num_samples=8)
    return config


def restored(config, workdir):
    trainer = training.trainer_class(config)(config, workdir)
    return jax.tree.map(np.asarray, trainer.restore()[0])


@pytest.fixture(scope="module")
def ae_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ae")
    training.train_and_evaluate(ae_config(), workdir)
    return workdir


def test_first_stage_trains_with_grids_psnr_and_resumes_exactly(ae_workdir, tmp_path):
    """2 + 2 steps equal 4 steps bit for bit (the discriminator and its Adam included); the
    discriminator trains from its step only; the grid of inputs above reconstructions and
    the PSNR are written."""
    training.train_and_evaluate(ae_config(num_steps=2), tmp_path)
    trainer = training.trainer_class(ae_config())(ae_config(), tmp_path)
    fresh, at_2 = trainer.init(), restored(ae_config(), tmp_path)
    # before disc_start (3) D's gradient is zero, and Adam leaves it exactly as it was
    jax.tree.map(np.testing.assert_array_equal, at_2.disc_params, fresh.disc_params)
    training.train_and_evaluate(ae_config(), tmp_path)
    a, b = restored(ae_config(), tmp_path), restored(ae_config(), ae_workdir)
    assert int(a.step) == 4 and a.disc_params is not None
    jax.tree.map(np.testing.assert_array_equal, a, b)
    moved = jax.tree.map(lambda x, y: bool(np.any(x != y)), a.disc_params, at_2.disc_params)
    assert all(jax.tree.leaves(moved))  # trained from step 3 on
    assert (ae_workdir / "samples" / "reconstructions_step_00000004.png").is_file()
    result = json.loads((ae_workdir / "eval" / "step_4.json").read_text())
    assert result["psnr_examples"] == 8 and 0 < result["psnr"] < 60


def test_psnr_restated():
    x = np.linspace(-1, 1, 2 * 16).reshape(2, 4, 4, 1).astype(np.float32)
    x_hat = x + np.float32(0.1) * np.sign(x + 1e-3)
    mse = np.mean((x - x_hat) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(autoencoder_training.psnr(x, x_hat), 10 * np.log10(4 / mse),
                               rtol=1e-5)  # fmt: skip


def test_encode_scale_is_one_over_std_of_the_first_latents():
    cfg = autoencoder.AutoencoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=2,
                                        out_ch=1, norm_groups=4)  # fmt: skip
    latent = first_stage.LatentSpec(cfg, (8, 8, 1), "", 0.0)
    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1), minval=-1, maxval=1)
    shapes = jax.eval_shape(first_stage.model(latent).init, jax.random.key(1), x)["params"]
    draw = np.random.default_rng(0).standard_normal
    params = jax.tree.map(lambda a: (0.3 * draw(a.shape)).astype(np.float32), shapes)
    rng, encode = jax.random.key(2), jax.jit(functools.partial(first_stage.encode, latent))
    z, scale = encode(params, x, rng, jnp.float32(0))
    raw, one = encode(params, x, rng, jnp.float32(1))  # z itself: a draw of q(z | x)
    assert float(one) == 1 and np.std(np.asarray(raw)) > 0
    np.testing.assert_allclose(scale, 1 / np.std(np.asarray(raw)), rtol=1e-5)
    np.testing.assert_allclose(np.std(np.asarray(z)), 1.0, rtol=1e-5)
    z2, kept = encode(params, x, rng, jnp.float32(0.25))
    assert float(kept) == 0.25
    np.testing.assert_allclose(z2, 0.25 * raw, rtol=1e-6)


@pytest.fixture(scope="module")
def latent_workdir(ae_workdir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("latent")
    training.train_and_evaluate(latent_config(ae_workdir), workdir)
    return workdir


def test_latent_model_resumes_exactly_with_the_first_batch_scale(ae_workdir, latent_workdir,
                                                                tmp_path):  # fmt: skip
    """2 + 2 steps equal 4 bit for bit; the scale is 1/std of the first batch's latents
    (drawn as the step draws them), kept in the state and the record."""
    config = latent_config(ae_workdir)
    training.train_and_evaluate(latent_config(ae_workdir, num_steps=2), tmp_path)
    training.train_and_evaluate(config, tmp_path)
    a, b = restored(config, tmp_path), restored(config, latent_workdir)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    setup = config_lib.build(config)
    assert setup.image_shape == (4, 4, 2) and setup.data_shape == (8, 8, 1)
    batch = next(input_pipeline.train_iterator(config, 8, seed=config.seed))
    ae_params = first_stage.load_params(setup.latent)
    init = training.Trainer(config, tmp_path / "fresh").init()
    rng = jax.random.fold_in(jax.random.fold_in(np.asarray(init.rng), 0), 4)
    _, want = first_stage.encode(setup.latent, ae_params, batch, rng, jnp.float32(0))
    np.testing.assert_allclose(a.latent_scale, want, rtol=1e-6)
    assert first_stage.checkpoint_scale(latent_workdir, 4) == float(a.latent_scale)


@pytest.mark.parametrize("method", ["ancestral", "unipc3"])
def test_samples_are_the_decoded_latent_chain(ae_workdir, latent_workdir, method):
    """A latent model's sample_fn equals the same chain run as a pixel model of the latent
    shape, then decoded: D(z / scale) clipped."""
    config = latent_config(ae_workdir)
    config.sampling.update(method=method, num_steps=0 if method == "ancestral" else 5)
    setup = config_lib.build(config)
    unet_params, step = sampling.restore_params(latent_workdir, config)
    params = first_stage.bundle(setup, unet_params, latent_workdir, step)
    rng = jax.random.key(3)
    got = sampling.Sampler(setup)(params, rng, 6, output="float")
    z = sampling.Sampler(dataclasses.replace(setup, latent=None))(unet_params, rng, 6, "float")
    want = first_stage.decode(setup.latent, params.autoencoder, params.scale, z)
    assert got.shape == (6, 8, 8, 1)
    np.testing.assert_allclose(got, want, atol=2e-6)
    with pytest.raises(UserError, match="LatentModel"):
        sampling.Sampler(setup)(unet_params, rng, 2)


def test_latent_evaluation_decodes_samples_and_names_the_bound_space(
    ae_workdir, latent_workdir, tmp_path
):
    config = latent_config(ae_workdir)
    config.eval.update(fid_split="test[:8]", inception_path=str(fid_file()),
                       stats_dir=str(tmp_path / "stats"))  # fmt: skip
    setup = config_lib.build(config)
    unet_params, step = sampling.restore_params(latent_workdir, config)
    params = first_stage.bundle(setup, unet_params, latent_workdir, step)
    scalars, _ = eval_modes.run(config, setup, params, ["nll", "fid"], 8, 8, max_batches=1)
    assert scalars["bpd_space"].startswith("latent 4x4x2") and np.isfinite(scalars["bpd"])
    assert np.isfinite(scalars["fid"]) and scalars["num_samples"] == 8


def test_class_conditional_latent_model_with_guidance(ae_workdir, tmp_path):
    config = latent_config(ae_workdir, num_steps=2, label_dropout=0.2)
    config.model.num_classes = 10
    config.sampling.update(method="dpm++2m", num_steps=4, guidance=1.0)
    state = training.train_and_evaluate(config, tmp_path)
    setup = config_lib.build(config)
    params = first_stage.bundle(setup, state.ema_params, tmp_path, 2)
    labels = np.array([0, 1, 2, 3])
    x = sampling.Sampler(setup)(params, jax.random.key(0), 4, labels=labels)
    assert x.shape == (4, 8, 8, 1) and x.dtype == np.uint8


def test_refusals_name_the_setting(ae_workdir, latent_workdir):
    config = latent_config(ae_workdir)
    config.autoencoder.latent_channels = 3
    with pytest.raises(UserError, match=r"config.autoencoder.path: .*\(4, 4, 2\) latents"):
        config_lib.build(config)
    config = latent_config(latent_workdir)  # a diffusion model's workdir
    with pytest.raises(UserError, match="holds a diffusion model, not a first stage"):
        config_lib.build(config)
    config = latent_config(ae_workdir)
    config.sampling.clip_x0 = True
    with pytest.raises(UserError, match="clip_x0 must be False"):
        config_lib.build(config)
    with pytest.raises(UserError, match="first stage's config"):
        config_lib.build(ae_config())


def test_a_diffusers_autoencoder_kl_as_the_first_stage(tmp_path):
    """Its scaling_factor is the scale; the latents are its f = 4, z = 3 grid; samples
    decode through it."""
    with np.load(REFERENCES) as data:
        refs = {k: data[k] for k in data.files}
    folder = write_vae(tmp_path / "vae", refs, "vae_f4")
    config = latent_config(folder)
    config.data.image_size = 16
    config.autoencoder.update(latent_size=4, latent_channels=3)
    setup = config_lib.build(config)
    assert setup.latent.scale == 0.5 and setup.image_shape == (4, 4, 3)
    unet_params = jax.jit(setup.model.init)(
        jax.random.key(0), jnp.zeros((1, 4, 4, 3)), jnp.zeros((1,), jnp.int32)
    )["params"]
    params = first_stage.bundle(setup, unet_params)
    x = sampling.Sampler(setup)(params, jax.random.key(1), 2, output="float")
    assert x.shape == (2, 16, 16, 1) and np.all(np.abs(x) <= 1)
    config.autoencoder.latent_size = 8
    with pytest.raises(UserError, match="latent_size=4, latent_channels=3"):
        config_lib.build(config)


def test_padding_centres_digits_on_black():
    config = ae_config()
    config.data.update(image_size=32, pad=True)
    padded = next(input_pipeline.eval_dataset(config, 2)[0].as_numpy_iterator())[0]
    config.data.update(image_size=28, pad=False)
    plain = next(input_pipeline.eval_dataset(config, 2)[0].as_numpy_iterator())[0]
    np.testing.assert_array_equal(padded[:, 2:30, 2:30], plain)
    assert np.all(padded[:, :2] == -1) and np.all(padded[:, :, 30:] == -1)


def test_the_latent_configs_have_ldm_sizes():
    """celeba_hq_autoencoder is LDM's kl-f4 layout; celeba_hq_latent's U-Net has LDM-4's
    274M parameters (LDM Table 13) on 64x64x3 latents, its schedule LDM's "linear"."""
    count = lambda tree: sum(math.prod(a.shape) for a in jax.tree.leaves(tree))  # noqa: E731
    ae = autoencoder_training.build(config_lib.load_config("celeba_hq_autoencoder"), 4)
    x = jnp.zeros((1, *ae.image_shape))
    assert count(jax.eval_shape(ae.model.init, jax.random.key(0), x)) == 55_312_063
    config = config_lib.load_config("celeba_hq_latent")
    setup = config_lib.build(config, 4, first_stage=(ae.autoencoder, 0.0))
    assert setup.image_shape == (64, 64, 3) and setup.data_shape == (256, 256, 3)
    assert count(convert.expected_params(setup)) == 274_056_163
    want = np.linspace(0.0015**0.5, 0.0195**0.5, 1000, dtype=np.float64) ** 2
    np.testing.assert_allclose(setup.schedule.betas, want, rtol=1e-6)  # (float32)
    mnist_ae = autoencoder_training.build(config_lib.load_config("mnist_autoencoder"))
    mnist = config_lib.build(config_lib.load_config("mnist_latent"),
                             first_stage=(mnist_ae.autoencoder, 0.0))  # fmt: skip
    assert (mnist.image_shape, mnist.data_shape) == ((8, 8, 4), (32, 32, 1))


def flags_of(config, name):
    """--config.KEY=VALUE for each setting in which config differs from the packaged one."""
    base, flags = config_lib.load_config(name), []
    get = lambda c, key: functools.reduce(lambda d, k: d[k], key.split("."), c)  # noqa: E731
    for key in config_lib.setting_names(config):
        if get(config, key) != get(base, key):
            flags.append(f"--config.{key}={get(config, key)}")
    return flags


def test_entry_points_on_both_stages(ae_workdir, latent_workdir, tmp_path):
    """evaluate.py --eval psnr on the first stage; sample.py on the latent model (decoded
    images), and its refusal to edit."""

    def run(tool, *args):
        cmd = [sys.executable, str(ROOT / f"{tool}.py"), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)

    ae_flags = flags_of(ae_config(), "mnist_autoencoder")
    result = run("evaluate", "--config", "mnist_autoencoder", "--workdir", str(ae_workdir),
                 "--eval", "psnr", "--max_batches", "1", *ae_flags)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    scalars = json.loads(result.stdout.strip().splitlines()[-1])
    assert scalars["psnr_examples"] == 8 and scalars["step"] == 4
    latent_flags = flags_of(latent_config(ae_workdir), "mnist_latent")
    common = ["--config", "mnist_latent", "--workdir", str(latent_workdir), *latent_flags]
    out = tmp_path / "samples"
    result = run("sample", *common, "--out", str(out), "--num_samples", "3",
                 "--config.sampling.method=ddim", "--config.sampling.num_steps=4")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(out.with_suffix(".npz")) as data:
        assert data["images"].shape == (3, 8, 8, 1)
    result = run("sample", *common, "--out", str(tmp_path / "e"), "--strength", "0.5",
                 "--init_images", str(out.with_suffix(".npz")))  # fmt: skip
    assert result.returncode == 1 and "this is a latent model" in result.stderr


def test_latent_step_on_four_devices_equals_one(ae_workdir, tmp_path):
    """The encoding inside the step (and the first batch's scale, a std over the global
    batch) is the same sharded over 4 devices as on 1."""
    config = latent_config(ae_workdir)
    batches = [next(input_pipeline.train_iterator(config, 8, seed=s)) for s in range(2)]
    finals = []
    for devices in (jax.devices()[:1], jax.devices()):
        trainer = training.Trainer(config, tmp_path / str(len(devices)), devices)
        state = trainer.init()
        for batch in batches:
            state, _ = trainer.step(state, sharding.global_batch(batch, trainer.mesh))
        finals.append(jax.tree.map(np.asarray, state))
    np.testing.assert_allclose(finals[0].latent_scale, finals[1].latent_scale, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
                 finals[0].params, finals[1].params)  # fmt: skip


def test_a_first_stage_checkpoint_can_be_pinned(ae_workdir):
    config = latent_config(ae_workdir)
    config.autoencoder.step = 2
    pinned = first_stage.load_params(config_lib.build(config).latent)
    want, _ = sampling.restore_params(ae_workdir, first_stage.workdir_config(ae_workdir), step=2)
    newest = first_stage.load_params(config_lib.build(latent_config(ae_workdir)).latent)
    jax.tree.map(np.testing.assert_array_equal, pinned, want)
    differ = jax.tree.map(lambda a, b: bool(np.any(a != b)), pinned, newest)
    assert any(jax.tree.leaves(differ))
