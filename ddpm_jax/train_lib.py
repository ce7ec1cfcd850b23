"""Training state, the pure train step (Algorithm 1), and its sharded, jitted form.

train_step(state, x0) draws t ~ Uniform{0..T-1} and ε ~ N(0, I) on device from
fold_in(state.rng, state.step), takes one gradient step on the configured loss
(L_simple by default, eq. 14), clips the gradient norm, applies Adam with linear warmup
and updates the EMA of the parameters.
"""

import functools
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
import tensorflow as tf
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from ddpm_jax import (
    checkpointing,
    config_lib,
    data,
    diffusion,
    eval_lib,
    input_pipeline,
    sampling,
    sharding,
    unet,
)
from ddpm_jax.errors import UserError


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32[2] key; step keys are fold_in(rng, step)


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
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=params,
        opt_state=tx.init(params),
        rng=state_rng,
    )


def train_step(state, x0, *, config, model, sched, tx):
    """One update on a batch of images x0 in [-1, 1] (Algorithm 1). Returns (state, metrics)."""
    d = config.diffusion
    t_rng, eps_rng, dropout_rng = jax.random.split(jax.random.fold_in(state.rng, state.step), 3)
    t = jax.random.randint(t_rng, (x0.shape[0],), 0, sched.num_timesteps)  # line 3
    eps = jax.random.normal(eps_rng, x0.shape, x0.dtype)  # line 4
    x_t = diffusion.q_sample(sched, x0, t, eps)

    def loss_fn(params):  # line 5: the loss, averaged over the batch
        out = model.apply({"params": params}, x_t, t, train=True, rngs={"dropout": dropout_rng})
        losses = diffusion.training_losses(
            sched, out, x0, x_t, t, eps, d.loss_type, d.mean_type, d.var_type
        )
        return jnp.mean(losses)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(config.training, state.step)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    metrics = dict(
        loss=loss,
        grad_norm=optax.tree.norm(grads),
        lr=learning_rate_schedule(config)(state.step),
    )
    new_state = state.replace(
        step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state
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


def check_workdir(workdir):
    """Create workdir if needed and make sure it is writable, before any work starts.
    Returns (path, whether this call created it)."""
    path = Path(workdir).expanduser().resolve()
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"workdir {str(path)!r} is not writable ({e}); choose another --workdir"
        ) from e
    return path, created


def remove_if_unused(path):
    """Delete a workdir this run created, if no file was written in it (a run that stopped
    before its first step leaves nothing behind). Never touches a file."""
    if any(p.is_file() for p in path.rglob("*")):
        return
    for sub in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        sub.rmdir()
    path.rmdir()


class _Preemption:
    """Turns SIGTERM into a flag the loop checks, so that it can save and stop cleanly."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._previous = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint and stopping")
        self.requested = True

    def __exit__(self, *exc):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous)


class Trainer:
    """Everything a run needs, built (and checked) from a config before anything compiles."""

    def __init__(self, config, workdir, devices=None, prepare_data=False):
        self.config = config
        self.devices = devices = jax.devices() if devices is None else devices
        self.model_config = config_lib.check_config(config, len(devices), jax.process_count())
        if prepare_data:
            data.ensure_prepared(config, log=logging.info)
        input_pipeline.check_dataset(config, config.data.train_split)
        self.workdir, self.created_workdir = check_workdir(workdir)
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

    def restore_or_init(self, manager):
        """The latest checkpoint in the workdir, or a fresh state."""
        shardings = state_shardings(self.abstract_state, self.mesh)
        target = checkpointing.with_shardings(self.abstract_state, shardings)
        state = checkpointing.restore(manager, target)
        if state is None:
            return self.init()
        logging.info("resumed from step %d", int(state.step))
        return state

    def data(self, start_step):
        """The training stream from example start_step · per-process batch (exact resume)."""
        return input_pipeline.train_iterator(
            self.config,
            self.batch_size,
            self.config.seed,
            start_example=start_step * self.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )


class Reporter:
    """Metrics to TensorBoard and the log (process 0 only), with a progress bar on a terminal."""

    def __init__(self, workdir, num_steps, batch_size):
        self.enabled = jax.process_index() == 0
        self.num_steps, self.batch_size = num_steps, batch_size
        self.last_step = self.last_time = self.bar = None
        self.writer = (
            tf.summary.create_file_writer(str(workdir / "tensorboard")) if self.enabled else None
        )

    def begin(self, step):
        """Start the clocks once `step` is done: the first step's compilation is not counted
        in steps/s nor in the bar's rate and ETA."""
        self.last_step, self.last_time = step, time.time()
        if self.enabled and sys.stderr.isatty():
            self.bar = tqdm.tqdm(
                initial=step, total=self.num_steps, unit="step", dynamic_ncols=True
            )

    def write(self, step, scalars):
        """Log scalars at `step` and add steps/s and images/s since the last call."""
        now = time.time()
        if step > self.last_step:
            steps_per_s = (step - self.last_step) / max(now - self.last_time, 1e-9)
            scalars = dict(
                scalars, steps_per_s=steps_per_s, images_per_s=steps_per_s * self.batch_size
            )
        self.last_step, self.last_time = step, now
        if not self.enabled:
            return
        with self.writer.as_default(step=step):
            for name, value in scalars.items():
                tf.summary.scalar(name, value)
        self.writer.flush()
        text = ", ".join(f"{k} {v:.4g}" for k, v in scalars.items())
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(text)
        else:
            logging.info("step %d: %s", step, text)

    def image(self, step, name, grid):
        if self.enabled:
            with self.writer.as_default(step=step):
                tf.summary.image(name, grid[None], max_outputs=1)
            self.writer.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def write_samples(trainer, state, reporter, sample_fn):
    """config.training.num_sample_images EMA samples as workdir/samples/step_<N>.png
    (N zero-padded to 8 digits) and a TensorBoard image."""
    config = trainer.config
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), int(state.step))
    images = sample_fn(state.ema_params, rng, config.training.num_sample_images)
    grid = sampling.image_grid(images)
    if jax.process_index() == 0:
        out = trainer.workdir / "samples"
        out.mkdir(exist_ok=True)
        sampling.save_png(out / f"step_{int(state.step):08d}.png", grid)
        reporter.image(int(state.step), "ema_samples", grid)


def _check_finite(value, step, manager):
    if not math.isfinite(value):
        last = manager.latest_step()
        kept = (
            f"the last good checkpoint (step {last}) is untouched"
            if last is not None
            else "no checkpoint was written"
        )
        raise FloatingPointError(
            f"non-finite loss or gradient norm at or before step {step}; training stopped and "
            f"{kept}. Lower config.training.learning_rate or check the data."
        )


def _should_stop(preempt, step, log_every):
    """All processes must agree to stop (saving is collective): vote at log steps."""
    if jax.process_count() == 1:
        return preempt.requested
    if step % log_every:
        return False
    votes = multihost_utils.process_allgather(jnp.asarray(preempt.requested))
    return bool(jnp.any(votes))


def _setup(config, workdir, devices):
    """(trainer, manager, evaluator, sample_fn, state), all built and checked before the
    first step. A workdir this call created is removed again if setting up fails."""
    trainer, t = Trainer(config, workdir, devices, prepare_data=True), config.training
    try:
        manager = checkpointing.make_manager(trainer.workdir, t.keep_checkpoints, t.keep_period)
        evaluator = None
        if config.eval.every:  # built first: a bad Inception path fails before any compiling
            evaluator = eval_lib.PeriodicEvaluator(config, trainer.workdir, trainer.devices)
        sample_fn = None
        if t.sample_every:
            show = sys.stderr.isatty()
            sample_fn = sampling.make_sample_fn(config, trainer.devices, show, "sample grid")
        state = trainer.restore_or_init(manager)
    except BaseException:
        if trainer.created_workdir:
            remove_if_unused(trainer.workdir)
        raise
    return trainer, manager, evaluator, sample_fn, state


def train_and_evaluate(config, workdir, devices=None):
    """Train (or resume) per config in workdir: checkpoints, TensorBoard, sample grids and
    periodic evaluation (config.eval.every)."""
    trainer, manager, evaluator, sample_fn, state = _setup(config, workdir, devices)
    t, start = config.training, int(state.step)
    if start >= t.num_steps:
        logging.info("step %d >= num_steps %d: nothing to do", start, t.num_steps)
        return state
    batches = trainer.data(start)
    reporter = Reporter(trainer.workdir, t.num_steps, t.batch_size)
    sums, count = jnp.zeros(2), 0
    with _Preemption() as preempt:
        for step in range(start + 1, t.num_steps + 1):
            batch = sharding.global_batch(next(batches), trainer.mesh)
            state, metrics = trainer.train_step(state, batch)
            if step == start + 1:  # compiled and run: the clocks start now
                reporter.begin(int(state.step))
            sums, count = sums + jnp.stack([metrics["loss"], metrics["grad_norm"]]), count + 1
            stop = _should_stop(preempt, step, t.log_every)
            last = step == t.num_steps or stop
            if step % t.log_every == 0 or last:
                loss, grad_norm = (float(v) / count for v in sums)
                _check_finite(loss + grad_norm, step, manager)
                reporter.write(step, dict(loss=loss, grad_norm=grad_norm, lr=float(metrics["lr"])))
                sums, count = jnp.zeros(2), 0
            if step % t.checkpoint_every == 0 or last:
                _check_finite(float(jnp.sum(sums)), step, manager)
                checkpointing.save(manager, state, force=True)
            if sample_fn is not None and step % t.sample_every == 0:
                write_samples(trainer, state, reporter, sample_fn)
            if evaluator is not None and step % config.eval.every == 0:
                logging.info("step %d: eval %s", step, evaluator(state.ema_params, step))
            if stop:
                break
    manager.wait_until_finished()
    reporter.close()
    return state
