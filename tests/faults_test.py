"""Training, sampling and evaluation under faults: stop signals, errors in the loop, a
damaged latest checkpoint, a busy workdir, a full disk, another run's config (tiny config,
CPU). Each case asserts the exit (status or exception), the message's first line, and that
the checkpoints that existed before are still there and restorable."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_test import ROOT, run_train, train_command
from training_test import final_state, tiny_config

from ddpm_jax import (
    checkpointing,
    input_pipeline,
    reporting,
    training,
    workdir,
)
from ddpm_jax.errors import UserError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir trained for 2 steps (a checkpoint of step 2), written once; tests use copies."""
    path = tmp_path_factory.mktemp("trained")
    training.train_and_evaluate(tiny_config(num_steps=2, checkpoint_every=2), path)
    return path


def copy_of(trained, tmp_path):
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    return tmp_path


def no_temporary_dirs(path):
    return [p.name for p in (path / "checkpoints").iterdir() if not p.name.isdigit()] == []


def signalling(monkeypatch, at):
    """Training batches that send this process the signals `at` {batch index: [signals]}."""
    real = input_pipeline.train_iterator

    def batches(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            for signum in at.get(i, []):
                os.kill(os.getpid(), signum)
            yield batch

    monkeypatch.setattr(input_pipeline, "train_iterator", batches)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_saves_and_stops(tmp_path, monkeypatch, signum):
    signalling(monkeypatch, {2: [signum]})  # while the third step's batch is read
    before = signal.getsignal(signum)
    state = training.train_and_evaluate(tiny_config(num_steps=50, checkpoint_every=100), tmp_path)
    assert int(state.step) == 3 and checkpointing.steps(tmp_path) == [3]
    assert int(final_state(tmp_path).step) == 3 and no_temporary_dirs(tmp_path)
    assert signal.getsignal(signum) == before  # the handlers are put back
    assert not (tmp_path / "train.lock").exists()


def test_a_second_ctrl_c_stops_at_once_after_the_save_in_flight(tmp_path, monkeypatch, caplog):
    signalling(monkeypatch, {2: [signal.SIGINT, signal.SIGINT]})
    config = tiny_config(num_steps=50, checkpoint_every=2, log_every=100)
    with pytest.raises(KeyboardInterrupt):
        training.train_and_evaluate(config, tmp_path)
    assert checkpointing.steps(tmp_path) == [2] and no_temporary_dirs(tmp_path)
    assert int(final_state(tmp_path).step) == 2
    assert "training stopped by KeyboardInterrupt. The last good checkpoint is step 2" in (
        caplog.text
    )


def test_an_error_in_the_loop_finishes_the_save_and_names_it(tmp_path, monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("the grid could not be drawn")

    monkeypatch.setattr(reporting, "write_samples", broken)
    config = tiny_config(num_steps=8, checkpoint_every=4, sample_every=4)
    with pytest.raises(RuntimeError, match="the grid could not be drawn"):
        training.train_and_evaluate(config, tmp_path)  # the save of step 4 was in flight
    assert checkpointing.steps(tmp_path) == [4] and no_temporary_dirs(tmp_path)
    assert int(final_state(tmp_path).step) == 4
    assert "stopped by RuntimeError. The last good checkpoint is step 4 in" in caplog.text
    assert not (tmp_path / "train.lock").exists()


def test_resume_past_a_damaged_step_is_exact(tmp_path, caplog):
    training.train_and_evaluate(tiny_config(num_steps=4, checkpoint_every=2), tmp_path)
    uninterrupted = final_state(tmp_path)
    (tmp_path / "checkpoints" / "4" / "default" / "manifest.ocdbt").unlink()
    training.train_and_evaluate(tiny_config(num_steps=4, checkpoint_every=2), tmp_path)
    assert "checkpoints/4 is damaged" in caplog.text and "using step 2 instead" in caplog.text
    assert (tmp_path / "damaged_checkpoints" / "4" / "default").is_dir()
    jax.tree.map(np.testing.assert_array_equal, final_state(tmp_path), uninterrupted)


def test_after_sigkill_the_stale_lock_is_taken_over_and_resume_is_exact(tmp_path):
    cmd, env = train_command(tmp_path / "a", "--config.training.num_steps=1000")
    cmd += ["--config.training.checkpoint_every=2"]
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"  # as in this process
    killed = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    while not (tmp_path / "a" / "checkpoints" / "2").is_dir() and killed.poll() is None:
        time.sleep(0.02)
    killed.kill()  # no handler runs: the lock and perhaps a save in flight are left behind
    killed.wait()
    assert (tmp_path / "a" / "train.lock").exists()
    config = tiny_config(num_steps=8, checkpoint_every=2, keep_checkpoints=10)
    training.train_and_evaluate(config, tmp_path / "a")
    training.train_and_evaluate(tiny_config(num_steps=8, checkpoint_every=8), tmp_path / "b")
    jax.tree.map(
        np.testing.assert_array_equal, final_state(tmp_path / "a"), final_state(tmp_path / "b")
    )


def test_a_busy_workdir_stops_a_second_run_and_loses_nothing(tmp_path, trained):
    copy_of(trained, tmp_path)
    with workdir.Lock(tmp_path):
        with pytest.raises(UserError, match=f"^workdir .* is being trained by pid {os.getpid()}"):
            training.train_and_evaluate(tiny_config(num_steps=4), tmp_path)
        result = run_train(tmp_path, "--config.training.num_steps=4")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: workdir '{tmp_path}' is being trained by pid {os.getpid()} on host")
    )
    assert checkpointing.steps(tmp_path) == [2] and int(final_state(tmp_path).step) == 2


def test_a_failed_write_is_one_line_naming_the_path_and_the_last_good_step(tmp_path, trained):
    copy_of(trained, tmp_path)
    # Writing past 1 MB fails (EFBIG, SIGXFSZ ignored) as writing to a full disk does (ENOSPC).
    limit = ["bash", "-c", 'ulimit -f 1024 && trap "" XFSZ && exec "$@"', "limited"]
    result = run_train(tmp_path, "--config.training.num_steps=4", prefix=limit)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [last] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    # Step 3's save (tiny: every 3) fails, or, where the writes of a loaded machine happen
    # to land in files under 1 MB, step 4's: the error names that one and the one before.
    failed = 3 if f'"{tmp_path / "checkpoints"}/3.orbax-checkpoint-tmp/' in last else 4
    assert f'"{tmp_path / "checkpoints"}/{failed}.orbax-checkpoint-tmp/' in last, last
    assert "File too large" in last, last
    assert f"The last good checkpoint is step {failed - 1}" in last, last
    assert len(result.stderr.splitlines()) < 30  # no pages of tracebacks
    assert checkpointing.steps(tmp_path)[0] == failed - 1 == int(final_state(tmp_path).step)
    training.train_and_evaluate(tiny_config(num_steps=4), tmp_path)  # saves what failed again
    assert checkpointing.steps(tmp_path) == [4, 3] and int(final_state(tmp_path).step) == 4


def test_sample_py_with_another_runs_config_fails_at_once(tmp_path, trained):
    copy_of(trained, tmp_path)
    cmd = [sys.executable, str(ROOT / "sample.py"), "--config", str(ROOT / "configs" / "tiny.py")]
    cmd += ["--workdir", str(tmp_path), "--out", str(tmp_path / "s"), "--num_samples=2"]
    cmd += ["--config.data.image_size=16", "--config.diffusion.num_timesteps=30"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint {tmp_path / 'checkpoints' / '2'} was written with other settings: "
        "diffusion.num_timesteps=20 (this config: 30); data.image_size=8 (this config: 16). "
        f"Use the config the run was trained with (whole in {tmp_path / 'checkpoints' / '2'}"
        "/record/metadata), or a fresh --workdir"
    )
    assert not (tmp_path / "s.png").exists()


def test_keep_checkpoints_0_fails_at_once_and_deletes_nothing(tmp_path, trained):
    copy_of(trained, tmp_path)
    with pytest.raises(UserError, match=r"^config.training.keep_checkpoints must be >= 1, got 0"):
        training.train_and_evaluate(tiny_config(num_steps=4, keep_checkpoints=0), tmp_path)
    assert checkpointing.steps(tmp_path) == [2] and int(final_state(tmp_path).step) == 2


def test_evaluate_py_refuses_a_zero_batch_before_any_work(tmp_path, trained):
    copy_of(trained, tmp_path)
    cmd = [sys.executable, str(ROOT / "evaluate.py"), "--config", "tiny", "--eval=nll"]
    cmd += ["--workdir", str(tmp_path), "--batch_size=0"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("error: eval.batch_size=0 must be a positive multiple of the number of devices")
    )
    assert not (tmp_path / "eval").exists()  # nothing was evaluated or written


def test_a_run_whose_lock_is_taken_over_stops_before_its_next_save(tmp_path, monkeypatch):
    """Another host takes the lock over (it judged this run silent): the run stops at its
    next save without writing it, and leaves the other run's lock in place."""
    other = dict(host="elsewhere", pid=4242, since=1.0)
    real = input_pipeline.train_iterator

    def batches(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 3:
                (tmp_path / "train.lock").write_text(json.dumps(other))
            yield batch

    monkeypatch.setattr(input_pipeline, "train_iterator", batches)
    config = tiny_config(num_steps=8, checkpoint_every=2, keep_checkpoints=10)
    with pytest.raises(UserError, match="taken over by pid 4242 on host elsewhere.*step 2"):
        training.train_and_evaluate(config, tmp_path)
    assert checkpointing.steps(tmp_path) == [2]  # step 4 was not written
    assert json.loads((tmp_path / "train.lock").read_text()) == other


def test_under_nohup_sighup_is_ignored(tmp_path, monkeypatch):
    signalling(monkeypatch, {1: [signal.SIGHUP]})
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup starts a run
    try:
        state = training.train_and_evaluate(tiny_config(num_steps=4), tmp_path)
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert int(state.step) == 4 and checkpointing.steps(tmp_path)[0] == 4


def test_the_host_stays_at_most_max_ahead_steps_ahead(tmp_path, monkeypatch):
    """When step n is dispatched, step n - MAX_AHEAD - 1 has finished: a stop signal waits
    for at most MAX_AHEAD steps of device work before its save."""
    behind, real_init = [], training.Trainer.__init__
    a = jnp.full((256, 256), 1e-3)
    # ~20 ms of device work per step that depends on the loss: the host could run ahead.
    slow = jax.jit(lambda x: x + 0 * jnp.sum(jnp.linalg.matrix_power(a * (1 + 0 * x), 64)))

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        step, done = self.train_step, []

        def watched(state, batch):
            k = training.MAX_AHEAD + 1
            behind.append(sum(not m.is_ready() for m in done[:-k]) if len(done) > k else 0)
            state, metrics = step(state, batch)
            metrics = dict(metrics, loss=slow(metrics["loss"]))  # a device slower than the host
            done.append(metrics["loss"])
            return state, metrics

        self.train_step = watched

    monkeypatch.setattr(training.Trainer, "__init__", init)
    config = tiny_config(num_steps=40, checkpoint_every=100, log_every=100)
    training.train_and_evaluate(config, tmp_path)
    assert len(behind) == 40 and max(behind) == 0


def test_a_step_with_a_nan_ema_is_not_saved_and_the_last_good_one_is_kept(
    tmp_path, trained, monkeypatch
):
    """A resumed run whose EMA turns NaN while its loss is still finite (what an update of
    an inf learning rate does): that step is not saved, the error names step 2 as the last
    good one, and with keep_checkpoints=1 the rotation has not removed it."""
    copy_of(trained, tmp_path)
    real_init = training.Trainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        step = self.train_step

        def poisoned(state, batch):
            state, metrics = step(state, batch)
            nan = jax.tree.map(lambda a: a * np.nan, state.ema_params)
            return state.replace(ema_params=nan), metrics

        self.train_step = poisoned

    monkeypatch.setattr(training.Trainer, "__init__", init)
    config = tiny_config(num_steps=8, checkpoint_every=1, keep_checkpoints=1)
    with pytest.raises(
        checkpointing.NonFinite,
        match=r"^the train state of step 3 holds NaN.*"
        r"The last good checkpoint is step 2 in",
    ):
        training.train_and_evaluate(config, tmp_path)
    assert checkpointing.steps(tmp_path) == [2] and int(final_state(tmp_path).step) == 2


def test_sigterm_stops_a_run_even_if_it_started_ignored(tmp_path, monkeypatch):
    """nohup's rule is for SIGHUP (and SIGINT in background jobs); SIGTERM is how schedulers
    stop a job, so it saves and stops whatever the run inherited."""
    signalling(monkeypatch, {2: [signal.SIGTERM]})
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        state = training.train_and_evaluate(tiny_config(num_steps=50), tmp_path)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert int(state.step) == 3 and checkpointing.steps(tmp_path)[0] == 3
