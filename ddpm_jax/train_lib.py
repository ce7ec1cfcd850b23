"""Training state, the pure train step (Algorithm 1), and its sharded, jitted form.

train_step(state, x0) draws t ~ Uniform{0..T-1} (or by importance, timesteps.py) and
ε ~ N(0, I) on device from fold_in(state.rng, state.step), takes one gradient step on the
configured loss (L_simple by default, eq. 14), clips the gradient norm, applies Adam with
linear warmup and updates the EMA of the parameters.
"""

import dataclasses
import functools
import math
import signal
import sys
import threading
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from ddpm_jax import (
    checkpointing,
    config_lib,
    diffusion,
    eval_lib,
    reporting,
    sampling,
    sharding,
    timesteps,
    unet,
)
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.errors import UserError, file_system_error


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32[2] key; step keys are fold_in(rng, step)
    history: Any = None  # timesteps.LossHistory of the importance sampler, else None


def learning_rate_schedule(config):
    """lr · min(1, step / warmup), the authors' linear warmup (0 at the first step)."""
    t = config.training
    if t.warmup_steps == 0:
        return optax.constant_schedule(t.learning_rate)
    return optax.linear_schedule(0.0, t.learning_rate, t.warmup_steps)


def make_optimizer(config):
    """Clip the global gradient norm, then Adam (β1 0.9, β2 0.999, ε 1e-8) with warmup."""
    return optax.chain(
        optax.clip_by_global_norm(config.training.grad_clip),
        optax.adam(learning_rate_schedule(config)),
    )


def ema_decay_at(training, step):
    """The EMA decay at update `step` (0-based): training.ema_decay (the paper), or with
    training.ema_warmup min(ema_decay, (1 + step) / (10 + step)), so that early EMA
    weights follow the trained ones instead of holding the initial ones."""
    if not training.ema_warmup:
        return training.ema_decay
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(training.ema_decay, (1.0 + step) / (10.0 + step))


def init_state(config, model, tx):
    """A fresh TrainState: parameters from the model's initialisers, EMA = parameters."""
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    size, ch = config.data.image_size, config.data.num_channels
    x, t = jnp.zeros((1, size, size, ch)), jnp.zeros((1,), jnp.int32)
    params = model.init(init_rng, x, t)["params"]
    importance = config_lib.timestep_sampler(config) == timesteps.Sampler.IMPORTANCE
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=params,
        opt_state=tx.init(params),
        rng=state_rng,
        history=timesteps.init_history(config.diffusion.num_timesteps) if importance else None,
    )


def drop_labels(rng, y, p, num_classes):
    """Each label replaced by "no label" (num_classes) with probability p (classifier-free
    guidance's training, Ho & Salimans 2022)."""
    return jnp.where(jax.random.bernoulli(rng, p, y.shape), num_classes, y)


def train_step(state, batch, *, config, model, sched, tx):
    """One update on a batch of images x0 in [-1, 1], or (x0, labels) for a class model
    (Algorithm 1). Returns (state, metrics)."""
    spec = config_lib.diffusion_spec(config)
    x0, y = batch if isinstance(batch, tuple) else (batch, None)
    step_rng = jax.random.fold_in(state.rng, state.step)
    t_rng, eps_rng, dropout_rng = jax.random.split(step_rng, 3)
    if y is not None:
        p, classes = config.training.label_dropout, config.model.num_classes
        y = drop_labels(jax.random.fold_in(step_rng, 3), y, p, classes)
    t, weights = timesteps.sample(t_rng, state.history, x0.shape[0], sched.num_timesteps)  # l. 3
    eps = jax.random.normal(eps_rng, x0.shape, x0.dtype)  # line 4
    x_t = diffusion.q_sample(sched, x0, t, eps)

    def loss_fn(params):  # line 5: the loss, averaged over the batch
        rngs = {"dropout": dropout_rng}
        out = model.apply({"params": params}, x_t, t, y, train=True, rngs=rngs)
        losses = diffusion.training_losses(sched, spec, out, x0, x_t, t, eps)
        weighted = losses if weights is None else weights * losses
        return jnp.mean(weighted), losses

    (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(config.training, state.step)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    metrics = dict(
        loss=loss,
        grad_norm=optax.tree.norm(grads),
        lr=learning_rate_schedule(config)(state.step),
    )
    if y is not None:
        metrics["labels_dropped"] = jnp.sum(y == config.model.num_classes)
    history = None if state.history is None else timesteps.update(state.history, t, losses)
    new_state = state.replace(
        step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state, history=history
    )
    return new_state, metrics


def state_shardings(abstract_state, mesh):
    """Everything in the train state is replicated over the data-parallel mesh."""
    return jax.tree.map(lambda _: sharding.replicated(mesh), abstract_state)


def jit_init_state(config, model, tx, mesh):
    """init_state compiled to produce replicated arrays on every device of the mesh."""
    init = functools.partial(init_state, config, model, tx)
    out = state_shardings(jax.eval_shape(init), mesh)
    return jax.jit(init, out_shardings=out)


def jit_train_step(config, model, sched, tx, mesh, abstract_state):
    """train_step jitted with explicit shardings; the input state's buffers are donated."""
    step = functools.partial(train_step, config=config, model=model, sched=sched, tx=tx)
    state_sh = state_shardings(abstract_state, mesh)
    return jax.jit(
        step,
        in_shardings=(state_sh, sharding.batch_sharding(mesh)),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=0,
    )


# ---- The training loop --------------------------------------------------------------------


class StopSignals:
    """SIGTERM, SIGHUP (a closed terminal) and a first Ctrl-C (SIGINT) become a flag the loop
    checks, so that it saves a checkpoint and stops cleanly. A second Ctrl-C stops at once
    (KeyboardInterrupt), after the save in flight is finished."""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        again = " (Ctrl-C again: stop without saving)" if signum == signal.SIGINT else ""
        logging.warning("%s: saving a checkpoint and stopping%s", name, again)
        self.requested = True

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class Trainer:
    """Everything a run needs, built (and checked) from a config before anything compiles."""

    def __init__(self, config, workdir, devices=None, prepare_data=False):
        self.config = config
        self.devices = devices = jax.devices() if devices is None else devices
        self.model_config = config_lib.check_config(config, len(devices), jax.process_count())
        from ddpm_jax import data, input_pipeline  # TensorFlow: only where data is read

        if prepare_data:
            data.ensure_prepared(config, log=logging.info)
        input_pipeline.check_dataset(config, config.data.train_split)
        self.workdir, self.created_workdir = workdir_lib.check_workdir(workdir)
        self.mesh = sharding.make_mesh(devices)
        self.model = unet.UNet(self.model_config)
        self.sched = config_lib.make_schedule(config)
        self.tx = make_optimizer(config)
        self.init = jit_init_state(config, self.model, self.tx, self.mesh)
        self.abstract_state = jax.eval_shape(self.init)
        self.train_step = jit_train_step(
            config, self.model, self.sched, self.tx, self.mesh, self.abstract_state
        )
        self.batch_size = sharding.per_process_batch_size(config.training.batch_size)

    def restore(self, quarantine=False):
        """(state, step) of the newest good checkpoint in the workdir, or (None, None)."""
        shardings = state_shardings(self.abstract_state, self.mesh)
        target = checkpointing.with_shardings(self.abstract_state, shardings)
        return checkpointing.restore(self.workdir, target, self.config, quarantine)

    def restore_or_init(self):
        """The newest good checkpoint in the workdir (damaged newer ones are moved aside),
        or a fresh state."""
        state, step = self.restore(quarantine=True)
        if state is None:
            return self.init()
        logging.info("resumed from step %d", step)
        return state

    def data(self, start_step):
        """The training stream from example start_step · per-process batch (exact resume)."""
        from ddpm_jax import input_pipeline

        return input_pipeline.train_iterator(
            self.config,
            self.batch_size,
            self.config.seed,
            start_example=start_step * self.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )


class Diverged(UserError):
    """A non-finite loss or gradient norm: training stops, and that state is not saved."""


def _check_finite(value, step):
    if not math.isfinite(value):
        raise Diverged(
            f"non-finite loss or gradient norm at or before step {step}: training stopped "
            "without saving it. Lower config.training.learning_rate or check the data."
        )


def _should_stop(signals, step, log_every):
    """All processes must agree to stop (saving is collective): vote at log steps."""
    if jax.process_count() == 1:
        return signals.requested
    if step % log_every:
        return False
    votes = multihost_utils.process_allgather(jnp.asarray(signals.requested))
    return bool(jnp.any(votes))


def _lock(path):
    """Lock the workdir for this process group: process 0 holds the lock, and if it cannot,
    every process stops with its message."""
    lock, error = workdir_lib.Lock(path), ""
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except UserError as e:
            error = str(e)
    if jax.process_count() > 1:
        failed = multihost_utils.broadcast_one_to_all(jnp.int32(bool(error)))
        error = error or ("process 0 could not lock the workdir" if int(failed) else "")
    if error:
        raise UserError(error)
    return lock


@dataclasses.dataclass
class Run:
    """What a training run holds from setup to its end."""

    trainer: Trainer
    lock: workdir_lib.Lock
    manager: Any = None
    evaluator: Any = None
    sample_fn: Any = None
    reporter: Any = None

    def close(self):
        """Release everything (the lock last), whatever state the run ended in."""
        for close in (self.manager and self.manager.close, self.reporter and self.reporter.close):
            try:
                close and close()
            except Exception as e:  # already reported by the run's own error
                logging.warning("while closing: %s", e)
        self.lock.release()


def _setup(config, workdir, devices):
    """(run, state), all built and checked before the first step. A workdir this call
    created is removed again if setting up fails."""
    trainer, t = Trainer(config, workdir, devices, prepare_data=True), config.training
    run = Run(trainer, _lock(trainer.workdir))
    try:
        if config.eval.every:  # built first: a bad Inception path fails before any compiling
            run.evaluator = eval_lib.PeriodicEvaluator(config, trainer.workdir, trainer.devices)
        if t.sample_every:
            show = sys.stderr.isatty()
            run.sample_fn = sampling.make_sample_fn(config, trainer.devices, show, "sample grid")
        state = trainer.restore_or_init()  # holding the lock: it may move damaged steps aside
        run.manager = checkpointing.make_manager(trainer.workdir, t.keep_checkpoints, t.keep_period)
    except BaseException:
        run.close()
        if trainer.created_workdir:
            workdir_lib.remove_if_unused(trainer.workdir)
        raise
    run.reporter = reporting.Reporter(trainer.workdir, t.num_steps, t.batch_size)
    return run, state


def _last_good(run):
    """Finish (or report the failure of) the save in flight, then a sentence naming the
    newest checkpoint that reads and verifies."""
    try:
        run.manager.wait_until_finished()
    except Exception as e:
        logging.error("the checkpoint being saved was not committed: %s", e)
    directory = checkpointing.checkpoint_dir(run.trainer.workdir)
    try:
        _, step = run.trainer.restore()
    except UserError as e:
        return str(e)
    if step is None:
        return "No checkpoint was written."
    return f"The last good checkpoint is step {step} in {directory}."


def _end_of_step(run, state, step, last):
    """Checkpoint, sample grid and evaluation due after `step`."""
    config, t = run.trainer.config, run.trainer.config.training
    if step % t.checkpoint_every == 0 or last:
        checkpointing.save(run.manager, state, config, force=True)
    if run.sample_fn is not None and step % t.sample_every == 0:
        reporting.write_samples(run.trainer, state, run.reporter, run.sample_fn)
    if run.evaluator is not None and step % config.eval.every == 0:
        logging.info("step %d: eval %s", step, run.evaluator(state.ema_params, step))


def mean_metrics(pending):
    """Means of the (loss, grad_norm) pairs of the steps since the last log, fetched from
    the devices in one transfer (the steps themselves never wait for the host)."""
    values = np.asarray(jax.device_get([v.addressable_data(0) for v in sum(pending, ())]))
    loss, grad_norm = values.reshape(-1, 2).mean(axis=0, dtype=np.float64)
    return float(loss), float(grad_norm)


def _train(run, state, signals):
    """Steps from state.step to num_steps, or until a stop signal (then saved)."""
    trainer, t = run.trainer, run.trainer.config.training
    start = int(state.step)
    batches, pending = trainer.data(start), []
    for step in range(start + 1, t.num_steps + 1):
        state, metrics = trainer.train_step(
            state, sharding.global_batch(next(batches), trainer.mesh)
        )
        if step == start + 1:  # compiled and run: the clocks start now
            run.reporter.begin(int(state.step))
        pending.append((metrics["loss"], metrics["grad_norm"]))  # no host work per step
        stop = _should_stop(signals, step, t.log_every)
        last = step == t.num_steps or stop
        if step % t.log_every == 0 or last or step % t.checkpoint_every == 0:
            loss, grad_norm = mean_metrics(pending)
            _check_finite(loss + grad_norm, step)  # before anything is saved
        if step % t.log_every == 0 or last:
            run.reporter.write(step, dict(loss=loss, grad_norm=grad_norm, lr=float(metrics["lr"])))
            pending = []
        _end_of_step(run, state, step, last)
        if stop:
            logging.warning("stopped at step %d, saved: the same command resumes", step)
            break
    return state


def train_and_evaluate(config, workdir, devices=None):
    """Train (or resume) per config in workdir: checkpoints, TensorBoard, sample grids and
    periodic evaluation (config.eval.every). On any exit the save in flight is finished
    first, and an error names the last good checkpoint."""
    run, state = _setup(config, workdir, devices)
    try:
        if int(state.step) >= config.training.num_steps:
            logging.info("step %d >= num_steps: nothing to do", int(state.step))
            return state
        with StopSignals() as signals:
            state = _train(run, state, signals)
        run.manager.wait_until_finished()
        return state
    except BaseException as error:
        note = _last_good(run)
        if isinstance(error, UserError):
            raise type(error)(f"{error} {note}") from None
        line = file_system_error(error)
        if line is not None:
            raise UserError(f"{line}. {note}") from error
        logging.error("training stopped by %s. %s", type(error).__name__, note)
        raise
    finally:
        run.close()
