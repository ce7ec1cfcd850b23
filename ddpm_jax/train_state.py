"""The train state and the pure train step (Algorithm 1), and their sharded, jitted forms.

train_step(state, x0) draws t ~ Uniform{0..T-1} (or by importance, timesteps.py) and
ε ~ N(0, I) on device from fold_in(state.rng, state.step), takes one gradient step on the
spec's loss (L_simple by default, eq. 14), clips the gradient norm, applies Adam with
linear warmup and updates the EMA of the parameters. Everything here takes the typed
setup (spec.py); the loop around it is training.py.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from ddpm_jax import diffusion, programs, sharding, timesteps
from ddpm_jax import first_stage as first_stage_lib  # `first_stage` is an argument
from ddpm_jax.spec import Setup, TimestepSampler, TrainSpec


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32[2] key; step keys are fold_in(rng, step)
    history: Any = None  # timesteps.LossHistory of the importance sampler, else None
    latent_scale: jax.Array | None = None  # a latent model's: float32, 0 until step 1


def learning_rate_schedule(training: TrainSpec) -> optax.Schedule:
    """lr · min(1, step / warmup), the authors' linear warmup (0 at the first step)."""
    if training.warmup_steps == 0:
        return optax.constant_schedule(training.learning_rate)
    return optax.linear_schedule(0.0, training.learning_rate, training.warmup_steps)


def make_optimizer(training: TrainSpec) -> optax.GradientTransformation:
    """Clip the global gradient norm, then Adam (β1 0.9, β2 0.999, ε 1e-8) with warmup."""
    return optax.chain(
        optax.clip_by_global_norm(training.grad_clip),
        optax.adam(learning_rate_schedule(training)),
    )


def ema_decay_at(training: TrainSpec, step) -> float | jax.Array:
    """The EMA decay at update `step` (0-based): training.ema_decay (the paper), or with
    training.ema_warmup min(ema_decay, (1 + step) / (10 + step)), so that early EMA
    weights follow the trained ones instead of holding the initial ones."""
    if not training.ema_warmup:
        return training.ema_decay
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(training.ema_decay, (1.0 + step) / (10.0 + step))


def init_state(setup: Setup, tx: optax.GradientTransformation) -> TrainState:
    """A fresh TrainState: parameters from the model's initialisers, EMA = parameters."""
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(setup.seed))
    x, t = jnp.zeros((1, *setup.image_shape)), jnp.zeros((1,), jnp.int32)
    params = setup.model.init(init_rng, x, t)["params"]
    importance = setup.training.timestep_sampler == TimestepSampler.IMPORTANCE
    T = setup.schedule.num_timesteps
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=params,
        opt_state=tx.init(params),
        rng=state_rng,
        history=timesteps.init_history(T) if importance else None,
        latent_scale=None if setup.latent is None else jnp.float32(setup.latent.scale),
    )


def drop_labels(rng: jax.Array, y: jax.Array, p: float, num_classes: int) -> jax.Array:
    """Each label replaced by "no label" (num_classes) with probability p (classifier-free
    guidance's training, Ho & Salimans 2022)."""
    return jnp.where(jax.random.bernoulli(rng, p, y.shape), num_classes, y)


def train_step(
    state: TrainState, batch, first_stage=None, *, setup: Setup, tx: optax.GradientTransformation
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update on a batch of images x0 in [-1, 1], or (x0, labels) for a class model
    (Algorithm 1); a latent model's images are encoded first by the frozen `first_stage`
    parameters (first_stage.encode). Returns (state, metrics)."""
    sched, spec, training = setup.schedule, setup.diffusion, setup.training
    x0, y = batch if isinstance(batch, tuple) else (batch, None)
    step_rng = jax.random.fold_in(state.rng, state.step)
    if setup.latent is not None:
        z_rng = jax.random.fold_in(step_rng, 4)
        x0, scale = first_stage_lib.encode(setup.latent, first_stage, x0, z_rng, state.latent_scale)
        state = state.replace(latent_scale=scale)
    t_rng, eps_rng, dropout_rng = jax.random.split(step_rng, 3)
    if y is not None:
        rng = jax.random.fold_in(step_rng, 3)
        y = drop_labels(rng, y, training.label_dropout, setup.num_classes)
    t, weights = timesteps.sample(t_rng, state.history, x0.shape[0], sched.num_timesteps)  # l. 3
    eps = jax.random.normal(eps_rng, x0.shape, x0.dtype)  # line 4
    x_t = diffusion.q_sample(sched, x0, t, eps)

    def loss_fn(params):  # line 5: the loss, averaged over the batch
        rngs = {"dropout": dropout_rng}
        out = setup.model.apply({"params": params}, x_t, t, y, train=True, rngs=rngs)
        losses = diffusion.training_losses(sched, spec, out, x0, x_t, t, eps)
        weighted = losses if weights is None else weights * losses
        return jnp.mean(weighted), losses

    (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        ema_params=ema_update(state.ema_params, params, ema_decay_at(training, state.step)),
        opt_state=opt_state,
        history=None if state.history is None else timesteps.update(state.history, t, losses),
    )
    lr = learning_rate_schedule(training)(state.step)
    metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads), lr=lr)
    if y is not None:
        metrics["labels_dropped"] = jnp.sum(y == setup.num_classes)
    return new_state, metrics


def ema_update(ema, params, decay) -> Any:
    """decay · EMA + (1 - decay) · parameters, leaf by leaf."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def state_shardings(abstract_state, mesh: jax.sharding.Mesh) -> Any:
    """Everything in the train state is replicated over the data-parallel mesh."""
    return jax.tree.map(lambda _: sharding.replicated(mesh), abstract_state)


def jit_init_state(
    setup: Setup, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh, abstract_state=None
) -> Callable[[], TrainState]:
    """init_state compiled to produce replicated arrays on every device of the mesh
    (abstract_state: its jax.eval_shape, if already known)."""
    init = functools.partial(init_state, setup, tx)
    abstract_state = jax.eval_shape(init) if abstract_state is None else abstract_state
    return jax.jit(init, out_shardings=state_shardings(abstract_state, mesh))


def jit_train_step(
    setup: Setup, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh, abstract_state,
    keep_program: bool = False,
) -> Callable:  # fmt: skip
    """train_step jitted with explicit shardings; the input state's buffers are donated.
    keep_program: the traced program is kept for the next launch (programs.CachedJit, keyed
    by the setup: only for tx = make_optimizer(setup.training))."""
    step = functools.partial(train_step, setup=setup, tx=tx)
    state_sh = state_shardings(abstract_state, mesh)
    frozen = () if setup.latent is None else (sharding.replicated(mesh),)  # the first stage
    kwargs = dict(
        in_shardings=(state_sh, sharding.batch_sharding(mesh), *frozen),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    if keep_program:
        return programs.CachedJit(step, "train_step", setup, **kwargs)
    return jax.jit(step, **kwargs)
