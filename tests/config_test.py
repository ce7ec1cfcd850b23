"""The configs: the paper's numbers, inheritance, and clear errors for bad settings."""

import math
from pathlib import Path

import jax
import pytest

from ddpm_jax import config_lib, convert
from ddpm_jax.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL = ["cifar", "celeba_hq", "lsun_church", "lsun_bedroom", "lsun_cat", "mnist", "tiny"]


def load(name):
    return config_lib.load_config(CONFIGS / f"{name}.py")


def num_params(config):
    return sum(
        math.prod(a.shape)
        for a in jax.tree.leaves(convert.expected_params(config_lib.build(config)))
    )


@pytest.mark.parametrize("name", ALL)
def test_every_config_is_valid(name):
    config = load(name)
    config_lib.build(config, num_devices=4 if name != "tiny" else 1)
    assert config_lib.make_schedule(config).num_timesteps == config.diffusion.num_timesteps


def test_cifar_is_the_paper():
    c = load("cifar")
    assert num_params(c) == 35_746_307
    assert (c.diffusion.beta_schedule, c.diffusion.beta_start, c.diffusion.beta_end) == (
        "linear",
        1e-4,
        0.02,
    )
    assert (c.diffusion.num_timesteps, c.diffusion.mean_type, c.diffusion.var_type) == (
        1000,
        "eps",
        "fixedlarge",
    )
    assert (c.training.learning_rate, c.training.warmup_steps, c.training.grad_clip) == (
        2e-4,
        5000,
        1.0,
    )
    assert (c.training.batch_size, c.training.ema_decay, c.training.num_steps) == (
        128,
        0.9999,
        800_000,
    )
    assert (c.model.dropout, c.data.random_flip, c.diffusion.loss_type) == (0.1, True, "mse")


@pytest.mark.parametrize(
    "name, flip, steps",
    [
        ("lsun_church", True, 1_200_000),
        ("lsun_bedroom", True, 2_400_000),
        ("lsun_cat", False, 1_800_000),
    ],
)
def test_256_configs(name, flip, steps):
    c, base = load(name), load("celeba_hq")
    assert num_params(c) == num_params(base) == 113_673_219
    assert (c.data.random_flip, c.training.num_steps) == (flip, steps)
    assert (c.training.learning_rate, c.training.batch_size, c.model.dropout) == (2e-5, 64, 0.0)
    assert c.diffusion.var_type == base.diffusion.var_type == "fixedsmall"
    assert c.to_dict()["model"] == base.to_dict()["model"]


@pytest.mark.parametrize(
    "setting, value, word",
    [
        ("training.batch_size", 6, "training.batch_size"),
        ("data.image_size", 9, "image_size"),
        ("diffusion.mean_type", "score", "mean_type"),
        ("diffusion.var_type", "learned", "var_type"),
        ("diffusion.loss_type", "huber", "loss_type"),
        ("diffusion.loss_type", "hybrid", "loss_type='hybrid' trains Σ_θ"),
        ("diffusion.var_type", "learned_range", "var_type='learned_range' is trained only by"),
        ("diffusion.hybrid_lambda", 0.0, "hybrid_lambda must be > 0"),
        ("training.timestep_sampler", "stratified", "timestep_sampler"),
        ("diffusion.beta_schedule", "sigmoid", "schedule"),
        ("diffusion.num_timesteps", 0, "num_timesteps"),
        ("model.ch", 40, "ch"),
        ("training.ema_decay", 1.0, "ema_decay"),
        ("sampling.method", "dpm", "sampling.method"),
        ("sampling.num_steps", 21, "num_steps"),
        ("sampling.eta", 1.5, "eta"),
        ("data.image_size", -8, "image_size must be a positive integer"),
        ("training.learning_rate", float("nan"), "learning_rate must be > 0"),
        ("training.learning_rate", 0.0, "learning_rate must be > 0"),
        ("training.num_steps", -1, "num_steps must be >= 1"),
        ("training.log_every", 0, "log_every must be >= 1"),
        ("training.checkpoint_every", 0, "checkpoint_every must be >= 1"),
        ("training.keep_checkpoints", 0, "keep_checkpoints must be >= 1"),
        ("training.keep_period", -5, r"keep_period must be >= 0 \(0: off\)"),
        ("training.sample_every", -1, r"sample_every must be >= 0 \(0: off\)"),
        ("training.num_sample_images", 0, "num_sample_images must be >= 1"),
        ("training.learning_rate", 1e39, "learning_rate must be > 0 and finite in float32"),
        ("sampling.batch_size", 0, "sampling.batch_size must be >= 1"),
        ("data.shuffle_buffer", 0, "shuffle_buffer must be >= 1"),
        ("diffusion.beta_start", 0.5, r"beta_start \(0.5\) must be <= beta_end \(0.2\)"),
    ],
)
def test_bad_settings_are_named(setting, value, word):
    """Each fails at once as a UserError (one line from the entry points) naming it."""
    config = load("tiny")
    group, key = setting.split(".")
    config[group][key] = value
    with pytest.raises(UserError, match=word):
        config_lib.build(config, num_devices=4)


def test_unknown_model_setting_and_missing_file():
    config = load("tiny")
    config.model.channels = 64
    with pytest.raises(ValueError, match="channels"):
        config_lib.unet_config(config)
    with pytest.raises(ValueError, match="does not exist"):
        config_lib.load_config(CONFIGS / "nope.py")


def test_a_packaged_configs_path_from_elsewhere_names_the_packaged_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs/mnist.py is relative to a clone's root
    with pytest.raises(UserError, match=r"^config file 'configs/mnist.py' does not exist \(rel"):
        config_lib.load_config("configs/mnist.py")
    with pytest.raises(UserError, match="the packaged config of that name is --config mnist$"):
        config_lib.load_config("configs/mnist.py")


@pytest.mark.parametrize(
    "text, message",
    [
        ("def get_config(:\n", r"line 1: invalid syntax; fix it$"),
        ("x = 1\n", r"has no get_config\(\) function; define one$"),
        ("def get_config():\n    return 1 / 0\n", r"raised ZeroDivisionError: division by zero"),
    ],
)
def test_a_broken_config_file_is_named(tmp_path, text, message):
    (tmp_path / "mine.py").write_text(text)
    with pytest.raises(UserError, match=rf"^config file {tmp_path / 'mine.py'}.*{message}"):
        config_lib.load_config(tmp_path / "mine.py")


def test_override_keys_are_checked_against_the_config():
    argv = ["train.py", "--config", str(CONFIGS / "tiny.py"), "--config.training.batch_size=8"]
    config_lib.check_config_flags(argv)  # a known key
    with pytest.raises(
        UserError,
        match=r"^--config.training.batchsize: the config has no "
        r"setting 'training.batchsize'; did you mean config.training.batch_size",
    ):
        config_lib.check_config_flags([*argv, "--config.training.batchsize=64"])
    with pytest.raises(UserError, match="no setting 'nothing_like_it'; see the config file"):
        config_lib.check_config_flags([*argv, "--config.nothing_like_it", "3"])
