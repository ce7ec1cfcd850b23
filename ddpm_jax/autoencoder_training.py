"""Training the first stage of latent diffusion (Rombach et al. 2022, §3.1, Appendix G).

A config with `config.stage = "autoencoder"` (configs/mnist_autoencoder.py) trains
autoencoder.Autoencoder on L_AE (autoencoder_loss.py) through train.py's loop: the same
checkpoints, resume, EMA, TensorBoard and signals as a diffusion model. This module holds
what differs: the typed setup, the train state (the autoencoder's parameters, their EMA and
Adam state, and the patch discriminator's parameters and Adam state when the adversarial
term is on), the jitted step and its two optimizers.
"""

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from ddpm_jax import autoencoder, autoencoder_loss, config_lib, lpips, sharding, train_state
from ddpm_jax.errors import UserError
from ddpm_jax.spec import Stage, TrainSpec


@dataclasses.dataclass(frozen=True, eq=False)
class FirstStageSetup:
    """Everything the first stage's core takes of its config (build)."""

    autoencoder: autoencoder.AutoencoderConfig
    loss: autoencoder_loss.LossSpec
    training: TrainSpec
    image_shape: tuple[int, int, int]
    seed: int = 0
    num_classes: int = 0  # (the data carry no labels for it)

    @property
    def data_shape(self) -> tuple[int, int, int]:
        return self.image_shape

    @functools.cached_property
    def model(self) -> autoencoder.Autoencoder:
        return autoencoder.Autoencoder(self.autoencoder)


def model_config(config) -> autoencoder.AutoencoderConfig:
    """The AutoencoderConfig of config.model (its image channels config.data's)."""
    fields = {f.name for f in dataclasses.fields(autoencoder.AutoencoderConfig)} - {"out_ch"}
    unknown = set(config.model) - fields
    if unknown:
        raise UserError(f"unknown config.model settings {sorted(unknown)}; known: {sorted(fields)}")
    model = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in config.model.items()}
    try:
        return autoencoder.AutoencoderConfig(**model, out_ch=config.data.num_channels)
    except ValueError as e:
        raise UserError(f"config.model: {e}") from None


def build(config, num_devices: int = 1, num_processes: int = 1) -> FirstStageSetup:
    """The typed setup of a first-stage config, every setting checked (a UserError names
    the setting and the fix)."""
    if config_lib.stage(config) != Stage.AUTOENCODER:
        raise UserError("not a first-stage config: it needs config.stage = 'autoencoder'")
    size, channels = config.data.image_size, config.data.num_channels
    cfg = model_config(config)
    try:
        cfg.latent_shape((size, size, channels))
        loss = autoencoder_loss.LossSpec(**config.loss)
    except (ValueError, TypeError) as e:
        raise UserError(f"config.data.image_size / config.loss: {e}") from None
    config_lib.check_batch("training.batch_size", config.training.batch_size, num_devices,
                           num_processes)  # fmt: skip
    config_lib.check_batch("eval.batch_size", config.eval.batch_size, num_devices, num_processes)
    training = config_lib.train_spec(config)
    return FirstStageSetup(cfg, loss, training, (size, size, channels), config.seed)


@flax.struct.dataclass
class AutoencoderState:
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array
    disc_params: Any = None  # the patch discriminator's, where loss.disc_weight > 0
    disc_opt_state: Any = None


def init_state(setup: FirstStageSetup, tx, disc_tx) -> AutoencoderState:
    """Fresh parameters (the discriminator's too, where it is on), EMA = parameters."""
    init_rng, disc_rng, state_rng = jax.random.split(jax.random.PRNGKey(setup.seed), 3)
    params = setup.model.init(init_rng, jnp.zeros((1, *setup.image_shape)))["params"]
    state = AutoencoderState(
        step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
        opt_state=tx.init(params), rng=state_rng,
    )  # fmt: skip
    if not setup.loss.adversarial:
        return state
    disc = autoencoder_loss.init_discriminator(disc_rng, setup.image_shape, setup.loss)
    return state.replace(disc_params=disc, disc_opt_state=disc_tx.init(disc))


def make_optimizers(setup: FirstStageSetup):
    """(the autoencoder's, the discriminator's): each Adam with the training's warmup and
    clipping (LDM trains both with Adam β = (0.5, 0.9); here the training's Adam, β2 0.999,
    for both, as the diffusion model)."""
    return train_state.make_optimizer(setup.training), train_state.make_optimizer(setup.training)


def generator_terms(setup: FirstStageSetup, params, disc_params, x, rng, step, lpips_params=None):
    """(L_AE, (metrics, x̂)) of a batch, z drawn from q(z | x) with rng; lpips_params: the
    perceptual network's, where loss.perceptual_weight > 0."""
    model, spec = setup.model, setup.loss
    perceptual = None if lpips_params is None else functools.partial(lpips.distance, lpips_params)
    mean, logvar = model.apply({"params": params}, x, method="encode")
    z = autoencoder.sample_posterior(rng, mean, logvar)
    h = model.apply({"params": params}, z, method="decode_features")
    w, apply_last = params["decoder"]["conv_out"], autoencoder.last_layer(setup.autoencoder)
    x_hat = apply_last(w, h)
    if spec.adversarial:
        total, metrics = autoencoder_loss.generator_loss(
            x, h, (w, apply_last), mean, logvar, disc_params, step, spec, perceptual
        )
    else:
        rec = autoencoder_loss.reconstruction(
            x, x_hat, spec.rec, perceptual, spec.perceptual_weight
        )
        kl = jnp.mean(autoencoder.kl(mean, logvar))
        total, metrics = rec + spec.kl_weight * kl, dict(rec=rec, kl=kl)
    return total, (metrics, x_hat)


def discriminator_update(setup: FirstStageSetup, disc_tx, state, x, x_hat):
    """(disc_params, disc_opt_state, hinge loss): one step of D on real x and fake x̂, with
    zero gradient before loss.disc_start."""
    spec = setup.loss

    def loss_fn(disc_params):
        real = autoencoder_loss.discriminator_logits(disc_params, x, spec)
        fake = autoencoder_loss.discriminator_logits(
            disc_params, jax.lax.stop_gradient(x_hat), spec
        )
        on = autoencoder_loss.switch(state.step, spec.disc_start)
        return on * autoencoder_loss.hinge_d_loss(real, fake)

    d_loss, grads = jax.value_and_grad(loss_fn)(state.disc_params)
    updates, opt_state = disc_tx.update(grads, state.disc_opt_state, state.disc_params)
    return optax.apply_updates(state.disc_params, updates), opt_state, d_loss


def train_step(state: AutoencoderState, x, lpips_params=None, *, setup: FirstStageSetup, tx,
               disc_tx):  # fmt: skip
    """One update of the autoencoder on L_AE, of its EMA, and of the discriminator;
    lpips_params: the frozen perceptual network's (loss.perceptual_weight > 0)."""
    rng = jax.random.fold_in(state.rng, state.step)
    terms = functools.partial(generator_terms, setup, lpips_params=lpips_params)
    grad_fn = jax.value_and_grad(terms, has_aux=True)
    (loss, (metrics, x_hat)), grads = grad_fn(state.params, state.disc_params, x, rng, state.step)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = train_state.ema_decay_at(setup.training, state.step)
    new = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state,
        ema_params=train_state.ema_update(state.ema_params, params, decay),
    )  # fmt: skip
    if setup.loss.adversarial:
        disc, disc_opt, d_loss = discriminator_update(setup, disc_tx, state, x, x_hat)
        new, metrics = (
            new.replace(disc_params=disc, disc_opt_state=disc_opt),
            metrics | {"d_loss": d_loss},
        )
    lr = train_state.learning_rate_schedule(setup.training)(state.step)
    return new, dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads), lr=lr)


def jit_functions(setup: FirstStageSetup, mesh):
    """(abstract state, jitted init, jitted step), the state replicated, the batch split
    over the mesh, the input state donated."""
    tx, disc_tx = make_optimizers(setup)
    init = functools.partial(init_state, setup, tx, disc_tx)
    abstract = jax.eval_shape(init)
    state_sh = train_state.state_shardings(abstract, mesh)
    step = functools.partial(train_step, setup=setup, tx=tx, disc_tx=disc_tx)
    frozen = (sharding.replicated(mesh),) if setup.loss.perceptual_weight else ()  # LPIPS
    jitted_step = jax.jit(
        step, in_shardings=(state_sh, sharding.batch_sharding(mesh), *frozen),
        out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0,
    )  # fmt: skip
    return abstract, jax.jit(init, out_shardings=state_sh), jitted_step


def reconstruct(setup: FirstStageSetup, params, x) -> jax.Array:
    """x̂ = decode(μ(x)), clipped to [-1, 1]: the reconstruction of the posterior mean."""
    mean, _ = setup.model.apply({"params": params}, x, method="encode")
    x_hat = setup.model.apply({"params": params}, mean, method="decode")
    return jnp.clip(x_hat, -1.0, 1.0)


def psnr(x, x_hat) -> jax.Array:
    """Per-example PSNR in dB of images in [-1, 1] (peak-to-peak 2): 10 log10(4 / MSE)."""
    mse = jnp.mean((x - x_hat) ** 2, axis=tuple(range(1, x.ndim)))
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))
