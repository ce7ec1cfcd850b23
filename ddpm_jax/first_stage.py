"""The frozen first stage of a latent diffusion model (Rombach et al. 2022, §3.2 and §4).

`config.autoencoder.path` names a first stage: a workdir of train.py with a first-stage
config (autoencoder_training.py), or a diffusers AutoencoderKL folder (the Stable
Diffusion VAE layout, diffusers_vae.py). The diffusion model then runs on z · scale, z a
draw of the posterior q(z | x) of each training image, encoded in the train step itself;
`scale` is the folder's scaling_factor, config.autoencoder.scale, or, for a first stage
trained here, 1/std of the first training batch's latents (LDM's rescaling, §4.3.2 and
Appendix G), kept in the train state and in each checkpoint's record. Samples are decoded
at the end of sampling: x = D(z / scale), clipped to [-1, 1].

    params = first_stage.LatentModel(unet=ema_params, autoencoder=ae_params, scale=scale)
    images = sampling.Sampler(setup)(params, rng, 16)
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from ddpm_jax import autoencoder, checkpointing, fs
from ddpm_jax.errors import UserError
from ddpm_jax.spec import LatentSpec, Setup, Stage


@flax.struct.dataclass
class LatentModel:
    """What a latent model's sample_fn and bound take as its parameters."""

    unet: Any  # the diffusion model's (EMA) parameters
    autoencoder: Any  # the frozen first stage's
    scale: jax.Array  # float32 scalar: the diffusion runs on z · scale


def is_workdir(path) -> bool:
    return (fs.as_path(path) / "checkpoints").is_dir()


def workdir_config(workdir) -> ml_collections.ConfigDict:
    """The config recorded with the newest step of a first stage's workdir."""
    steps = checkpointing.steps(workdir)
    if not steps:
        raise UserError(f"config.autoencoder.path: {workdir} has no checkpoint; train it first")
    directory = checkpointing.checkpoint_dir(workdir) / str(steps[0])
    record = checkpointing.read_record(directory)
    if record is None or "config" not in record:
        raise UserError(f"config.autoencoder.path: {directory} has no record of its config")
    config = ml_collections.ConfigDict(record["config"])
    if config.get("stage", Stage.DIFFUSION) != Stage.AUTOENCODER:
        raise UserError(
            f"config.autoencoder.path: {workdir} holds a diffusion model, not a first stage "
            "(a run of a config with stage = 'autoencoder', e.g. --config mnist_autoencoder)"
        )
    return config


def describe(path) -> tuple[autoencoder.AutoencoderConfig, float]:
    """(AutoencoderConfig, scaling factor: the diffusers folder's, 0 for a workdir's first
    stage) of config.autoencoder.path; no weights are read."""
    if is_workdir(path):
        from ddpm_jax import autoencoder_training

        return autoencoder_training.model_config(workdir_config(path)), 0.0
    from ddpm_jax import diffusers_vae

    try:
        _, cfg, scale = diffusers_vae.describe(path)
    except UserError as e:
        raise UserError(
            f"config.autoencoder.path: {e} (give a first stage's training workdir or a "
            "diffusers AutoencoderKL folder)"
        ) from None
    return cfg, scale


def load_params(latent: LatentSpec, sharding=None):
    """The first stage's parameters: a workdir's newest good EMA weights, or a diffusers
    folder's."""
    if is_workdir(latent.source):
        config, step = workdir_config(latent.source), latent.step or None
        params, step = checkpointing.restore_params(latent.source, config, step=step,
                                                    sharding=sharding)  # fmt: skip
        logging.info("first stage: the EMA weights of step %d in %s", step, latent.source)
        return params
    from ddpm_jax import diffusers_vae

    return diffusers_vae.load(latent.source)[1]


def model(latent: LatentSpec) -> autoencoder.Autoencoder:
    return autoencoder.Autoencoder(latent.autoencoder)


def encode(latent: LatentSpec, params, x, rng, scale) -> tuple[jax.Array, jax.Array]:
    """(z · scale, scale), z ~ q(z | x) drawn with rng; where scale is 0 (not yet set) it
    becomes 1/std of these latents (LDM's rescaling by the first batch). No gradient flows
    to the frozen first stage."""
    mean, logvar = model(latent).apply({"params": params}, x, method="encode")
    z = jax.lax.stop_gradient(autoencoder.sample_posterior(rng, mean, logvar))
    scale = jnp.where(scale > 0, scale, 1.0 / jnp.std(z)).astype(jnp.float32)
    return z * scale, scale


def encode_mean(latent: LatentSpec, params, x, scale) -> jax.Array:
    """μ(x) · scale: the posterior mean's latents (the bound's data)."""
    mean, _ = model(latent).apply({"params": params}, x, method="encode")
    return mean * scale


def decode(latent: LatentSpec, params, scale, z) -> jax.Array:
    """x = D(z / scale), clipped to [-1, 1]: the images of latents z."""
    x = model(latent).apply({"params": params}, z / scale, method="decode")
    return jnp.clip(x, -1.0, 1.0)


def checkpoint_scale(workdir, step) -> float:
    """The latents' scale recorded with a latent model's checkpoint of `step`."""
    directory = checkpointing.checkpoint_dir(workdir) / str(step)
    record = checkpointing.read_record(directory) or {}
    if not record.get("latent_scale"):
        raise UserError(f"{directory} records no latent scale: not a latent model's checkpoint")
    return float(record["latent_scale"])


def bundle(setup: Setup, unet_params, workdir=None, step=None) -> Any:
    """A latent model's LatentModel (its scale from the checkpoint of `step` in `workdir`,
    else config.autoencoder.scale or the folder's), a pixel model's parameters as they
    are."""
    latent = setup.latent
    if latent is None:
        return unet_params
    scale = checkpoint_scale(workdir, step) if workdir is not None else latent.scale
    if not scale > 0:
        raise UserError(
            "this latent model's scale is not known: set config.autoencoder.scale, or load "
            "its checkpoint with --workdir (the scale is recorded there)"
        )
    return LatentModel(unet_params, load_params(latent), jnp.float32(scale))


def check_params(setup: Setup, params):
    """A latent model's sampler and bound take a LatentModel; a pixel model's do not."""
    if (setup.latent is not None) != isinstance(params, LatentModel):
        want = "first_stage.LatentModel" if setup.latent is not None else "the U-Net's params"
        raise UserError(
            f"this {'latent' if setup.latent else 'pixel-space'} model takes {want} "
            "(first_stage.bundle(setup, params, workdir, step) builds it)"
        )
