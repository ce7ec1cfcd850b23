"""The training loop: setup, stop signals, the workdir lock, checkpoints, reporting, and
the exit policy around the jitted step of train_state.py.

`train_and_evaluate(config, workdir)` builds the typed setup once (config_lib.build),
resumes from the newest good checkpoint or starts afresh, and runs the steps; a stop
signal saves and stops, an error names the last good checkpoint.
"""

import concurrent.futures
import dataclasses
import functools
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from ddpm_jax import (
    checkpointing,
    config_lib,
    eval_modes,
    first_stage,
    reporting,
    sampling,
    sharding,
    timeline,
    train_state,
)
from ddpm_jax import data_worker as data_worker_lib
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.errors import UserError, file_system_error
from ddpm_jax.spec import Stage
from ddpm_jax.stop_signals import StopSignals

# Steps the host may dispatch ahead of the devices: enough to keep them busy, few enough
# that a stop signal is saved within about MAX_AHEAD + 1 steps of when it came.
MAX_AHEAD = 2


class Trainer:
    """Everything a run needs, built (and checked) from a config before anything compiles:
    the typed setup, the workdir, the mesh and the jitted init and step."""

    def __init__(
        self, config, workdir, devices=None, prepare_data=False, data_worker=False,
        other_splits=(),
    ):  # fmt: skip
        self.config = config
        self.devices = devices = jax.devices() if devices is None else devices
        self.setup = self.build_setup(config, len(devices), jax.process_count())
        self.batch_size = sharding.per_process_batch_size(config.training.batch_size)
        self.worker, self.data_checks = None, dict(prepare=prepare_data, other_splits=other_splits)
        if data_worker:  # TensorFlow in a child process, beside the restore and compile
            worker = data_worker
            if not isinstance(worker, data_worker_lib.DataWorker):
                worker = data_worker_lib.DataWorker()
            self._start_worker(worker)
        else:
            self.check_data(prepare_data)
        try:
            self._build(workdir)
        except BaseException:
            self.close()
            raise

    build_setup = staticmethod(config_lib.build)  # the typed setup of the config

    def _start_worker(self, worker):
        self.worker = worker
        config = self.config
        worker.start(
            config, self.batch_size, config.seed, jax.process_index(), jax.process_count(),
            **self.data_checks,
        )  # fmt: skip

    def _build(self, workdir):
        self.workdir, self.created_workdir = workdir_lib.check_workdir(workdir)
        self.mesh = sharding.make_mesh(self.devices)
        self.tx = train_state.make_optimizer(self.setup.training)
        abstract = jax.eval_shape(functools.partial(train_state.init_state, self.setup, self.tx))
        self.init = train_state.jit_init_state(self.setup, self.tx, self.mesh, abstract)
        self.abstract_state = abstract
        self.train_step = train_state.jit_train_step(
            self.setup, self.tx, self.mesh, self.abstract_state, keep_program=True
        )
        self.frozen = ()  # a latent model's first stage: the step's third argument
        if self.setup.latent is not None:
            where = sharding.replicated(self.mesh)
            self.frozen = (first_stage.load_params(self.setup.latent, where),)

    def step(self, state, batch):
        """One train step on a global batch (and the frozen first stage, if any)."""
        return self.train_step(state, batch, *self.frozen)

    def sample_params(self, state):
        """What the sampler and the evaluator take: the EMA parameters (with a latent
        model's first stage and scale)."""
        if self.setup.latent is None:
            return state.ema_params
        return first_stage.LatentModel(state.ema_params, self.frozen[0], state.latent_scale)

    def sampler(self):
        """The sampler of the training's sample grids."""
        show = sys.stderr.isatty()
        return sampling.Sampler(self.setup, self.devices, show, "sample grid")

    def evaluator(self, check_data):
        """The periodic evaluation (config.eval.every)."""
        return eval_modes.PeriodicEvaluator(
            self.config, self.setup, self.workdir, self.devices, check_data
        )

    def write_grid(self, sample_fn, state, reporter):
        """The sample grid of `state` (config.training.num_sample_images)."""
        reporting.write_samples(
            sample_fn, self.sample_params(state), int(state.step), self.config.seed,
            self.config.training.num_sample_images, self.workdir, reporter,
        )  # fmt: skip

    def abstract_batch(self):
        """The global batch's shape, dtype and sharding: images, and labels for a class model."""
        size, batch_sharding = self.config.training.batch_size, sharding.batch_sharding(self.mesh)
        images = jax.ShapeDtypeStruct((size, *self.setup.data_shape), jnp.float32)
        labels = jax.ShapeDtypeStruct((size,), jnp.int32)
        batch = (images, labels) if self.setup.num_classes else images
        return jax.tree.map(lambda a: a.update(sharding=batch_sharding), batch)

    def compile_step(self):
        """Compile (or load) the train step for the state and batch it will be given, in a
        thread, while the state is restored and the data worker starts (where the program
        is kept: programs.CachedJit; otherwise at the first step). Returns a Future."""
        shardings = train_state.state_shardings(self.abstract_state, self.mesh)
        state = jax.tree.map(lambda a, s: a.update(sharding=s), self.abstract_state, shardings)
        compiling = concurrent.futures.ThreadPoolExecutor(1, "compile")
        warm = getattr(self.train_step, "warm", lambda *args: None)
        future = compiling.submit(warm, state, self.abstract_batch(), *self.frozen)
        compiling.shutdown(wait=False)
        return future

    def close(self):
        """Stop the data worker, if there is one."""
        if self.worker is not None:
            self.worker.close()

    def check_data(self, prepare=False):
        """The dataset prepared (if `prepare`) and its training split readable, or a
        UserError; with a data worker, once the worker has checked."""
        if self.worker is not None:
            return self.worker.wait_ready()
        from ddpm_jax import data, input_pipeline  # TensorFlow: only where data is read

        if prepare:
            data.ensure_prepared(self.config, log=logging.info)
        input_pipeline.check_dataset(self.config, self.config.data.train_split)

    def restore(self, quarantine=False):
        """(state, step) of the newest good checkpoint in the workdir, or (None, None)."""
        shardings = train_state.state_shardings(self.abstract_state, self.mesh)
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

    def data(self, start_step, again=False):
        """The training stream from example start_step · per-process batch (exact resume).
        again: a data worker asked before for another start is replaced by a new one."""
        if self.worker is not None:
            if again:
                self.worker.close()
                self._start_worker(data_worker_lib.DataWorker())
            return self.worker.batches(start_step * self.batch_size)
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


def _on_process_0(fn, what):
    """fn() on process 0, which holds the workdir lock; if it raises a UserError, every
    process raises one (`what` failed on process 0)."""
    error = ""
    if jax.process_index() == 0:
        try:
            fn()
        except UserError as e:
            error = str(e)
    if jax.process_count() > 1:
        failed = multihost_utils.broadcast_one_to_all(jnp.int32(bool(error)))
        error = error or (f"{what} failed on process 0" if int(failed) else "")
    if error:
        raise UserError(error)


def _lock(path):
    """Lock the workdir for this process group: process 0 holds the lock, and if it cannot,
    every process stops with its message."""
    lock = workdir_lib.Lock(path)
    _on_process_0(lock.acquire, "locking the workdir")
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
    batches: Any = None  # the training stream from the restored step

    def close(self):
        """Release everything (the lock last), whatever state the run ended in."""
        closing = (self.manager and self.manager.close, self.reporter and self.reporter.close)
        for close in (*closing, self.trainer.close):
            try:
                close and close()
            except Exception as e:  # already reported by the run's own error
                logging.warning("while closing: %s", e)
        self.lock.release()


def trainer_class(config):
    """Trainer, or for a first stage's config autoencoder_runs.AutoencoderTrainer."""
    if config_lib.stage(config) == Stage.AUTOENCODER:
        from ddpm_jax import autoencoder_runs

        return autoencoder_runs.AutoencoderTrainer
    return Trainer


def _setup(config, workdir, devices, data_worker):
    """(run, state), all built and checked before the first step. A workdir this call
    created is removed again if setting up fails."""
    t, e = config.training, config.eval
    reads_split = e.every and (e.get("nll_batches") or e.get("psnr_batches"))
    other_splits = (config.data.eval_split,) if data_worker and reads_split else ()
    trainer = trainer_class(config)(
        config, workdir, devices, prepare_data=True, data_worker=data_worker,
        other_splits=other_splits,
    )  # fmt: skip
    timeline.mark("built")
    run = Run(trainer, _lock(trainer.workdir))
    try:
        if config.eval.every:  # built first: a bad Inception path fails before any compiling
            run.evaluator = trainer.evaluator(not other_splits)
        if t.sample_every:
            run.sample_fn = trainer.sampler()
        compiling = trainer.compile_step()  # beside the restore
        newest = (checkpointing.steps(trainer.workdir) or [0])[0]
        run.batches = trainer.data(newest)  # a data worker reads from there meanwhile
        state = trainer.restore_or_init()  # holding the lock: it may move damaged steps aside
        timeline.mark("restored")
        if int(state.step) != newest:  # the newest was damaged: an older one was restored
            run.batches = trainer.data(int(state.step), again=True)
        compiling.result()
        timeline.mark("compiled")
        trainer.check_data()
        timeline.mark("data_checked")
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
        _on_process_0(run.lock.check, "checking the workdir lock")  # still ours: write
        checkpointing.save(run.manager, state, config, force=True)
    if run.sample_fn is not None and step % t.sample_every == 0:
        run.trainer.write_grid(run.sample_fn, state, run.reporter)
    if run.evaluator is not None and step % config.eval.every == 0:
        scalars = run.evaluator(run.trainer.sample_params(state), step)
        logging.info("step %d: eval %s", step, scalars)


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
    batches, pending = run.batches, []
    for step in range(start + 1, t.num_steps + 1):
        state, metrics = trainer.step(state, sharding.global_batch(next(batches), trainer.mesh))
        if step == start + 1:  # compiled and run: the clocks start now
            timeline.mark("first_step", metrics["loss"])
            run.reporter.begin(int(state.step))
        pending.append((metrics["loss"], metrics["grad_norm"]))  # no host work per step
        if len(pending) > MAX_AHEAD:  # the host stays at most MAX_AHEAD steps ahead
            pending[-MAX_AHEAD - 1][0].block_until_ready()
        if jax.process_count() == 1 and run.lock.lost is not None:
            run.lock.check()  # the heartbeat found the lock taken over: stop before writing
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


def train_and_evaluate(config, workdir, devices=None, data_worker=False):
    """Train (or resume) per config in workdir: checkpoints, TensorBoard, sample grids and
    periodic evaluation (config.eval.every). On any exit the save in flight is finished
    first, and an error names the last good checkpoint. data_worker: True, or a DataWorker
    started earlier: the training data are read in that child process (data_worker.py;
    train.py's way, for a faster start)."""
    run, state = _setup(config, workdir, devices, data_worker)
    try:
        if int(state.step) >= config.training.num_steps:
            logging.info("step %d >= num_steps: nothing to do", int(state.step))
            return state
        with StopSignals() as signals:
            state = _train(run, state, signals)
        run.manager.wait_until_finished()
        if int(state.step) >= config.training.num_steps:  # (a stop said so already)
            run.reporter.close()  # the bar ends before the closing line
            where = checkpointing.checkpoint_dir(run.trainer.workdir) / str(int(state.step))
            logging.info("finished at step %d; its checkpoint is %s", int(state.step), where)
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
