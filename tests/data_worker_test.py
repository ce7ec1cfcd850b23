"""data_worker: the child's batches are the in-process iterator's, from any start; its
errors reach the parent as the same one-line UserError; it ends with its parent's pipes."""

import numpy as np
import pytest
from training_test import tiny_config

from ddpm_jax import data_worker, input_pipeline, training
from ddpm_jax.errors import UserError


def started(config, **kwargs):
    worker = data_worker.DataWorker()
    worker.start(config, 8, seed=3, **kwargs)
    return worker


def test_the_same_batches_as_in_process_from_a_resumed_offset_then_it_ends_with_its_pipes():
    config = tiny_config()
    worker = started(config, other_splits=(config.data.eval_split,))
    try:
        worker.wait_ready()
        stream = worker.batches(40)
        local = input_pipeline.train_iterator(config, 8, 3, start_example=40)
        for _ in range(3):
            a, b = next(stream), next(local)
            assert a.dtype == b.dtype == np.float32 and a.shape == (8, 8, 8, 1)
            np.testing.assert_array_equal(a, b)
        # Running, with batches in the pipe: closing the parent's ends stops the child.
        worker.proc.stdout.close()
        worker.proc.stdin.close()
        assert worker.proc.wait(timeout=60) is not None
    finally:
        worker.close()


def test_a_dataset_error_is_the_same_user_error(tmp_path):
    config = tiny_config()
    config.data.data_dir = str(tmp_path)  # nothing prepared here
    with pytest.raises(UserError) as local:
        input_pipeline.check_dataset(config, config.data.train_split)
    worker = started(config)
    try:
        stream = worker.batches(0)  # the start is sent; the error comes with the stream
        with pytest.raises(UserError) as remote:
            next(stream)
    finally:
        worker.close()
    assert str(remote.value) == str(local.value)
    assert "not prepared" in str(remote.value)
    # A child that has already ended after its error: sending the start raises that error.
    worker = started(config)
    try:
        worker.proc.wait(timeout=120)
        with pytest.raises(UserError, match="not prepared"):
            worker.batches(0)
    finally:
        worker.close()


def test_a_child_that_dies_is_reported():
    worker = started(tiny_config())
    worker.proc.kill()
    with pytest.raises(RuntimeError, match="reader .* ended"):
        worker.wait_ready()
    worker.close()


def test_a_trainer_asks_again_when_an_older_step_is_restored(tmp_path):
    """The stream is asked for the newest step before restoring; a damaged newest step
    means another start, and a new worker."""
    config = tiny_config()
    trainer = training.Trainer(config, tmp_path / "run", data_worker=True)
    try:
        first = trainer.worker
        trainer.data(5)
        stream = trainer.data(2, again=True)
        assert trainer.worker is not first and first.proc.returncode is not None
        local = input_pipeline.train_iterator(config, 8, config.seed, start_example=16)
        np.testing.assert_array_equal(next(stream), next(local))
    finally:
        trainer.close()
