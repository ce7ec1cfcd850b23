"""Two real processes on 127.0.0.1 (gloo, two fake devices each) against one process."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from ddpm_jax import checkpointing, config_lib, distributed, sampling, sharding, training

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
import multiprocess_worker as worker  # noqa: E402
from conftest import mnist_data_dir  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(workdir, out, timeout=420):
    address = f"127.0.0.1:{free_port()}"
    cmd = lambda i: [
        sys.executable,
        str(Path(__file__).parent / "multiprocess_worker.py"),
        address,
        str(i),
        str(workdir),
        str(out),
    ]
    procs = [
        subprocess.Popen(cmd(i), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + timeout
        logs = [p.communicate(timeout=max(deadline - time.monotonic(), 1))[0] for p in procs]
    finally:
        for p in procs:  # never leave a process behind, whatever happened
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]


def test_two_processes_equal_one_and_checkpoint_moves_between_them(tmp_path):
    mnist_data_dir()  # the workers read $TFDS_DATA_DIR
    out = tmp_path / "two.npz"
    run_two_processes(tmp_path / "work", out)
    two = np.load(out)
    # One process, four devices, the same global batches.
    trainer = training.Trainer(worker.tiny_config(), tmp_path / "one")
    state = trainer.init()
    for batch in worker.global_batches():
        state, _ = trainer.train_step(state, sharding.global_batch(batch, trainer.mesh))
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    for key, value in flat:
        np.testing.assert_allclose(two["/".join(map(str, key))], value, rtol=1e-4, atol=1e-5)
    # The two-process checkpoint restores here, in one process, and samples the same images.
    restored, _ = checkpointing.restore_params(tmp_path / "work", worker.tiny_config())
    samples = sampling.make_sample_fn(worker.tiny_config())(restored, jax.random.PRNGKey(0), 8)
    np.testing.assert_array_equal(samples, two["samples"])
    # The bound over a split read half by half in two processes = one process.
    np.testing.assert_allclose(two["total_bpd"], worker.eval_bpd(restored), rtol=1e-5)
    assert two["total_bpd"].shape == (12,)
    # The training loop ran in both processes: checkpoints of steps 2 and 3, one event log.
    assert sorted(p.name for p in (tmp_path / "loop" / "checkpoints").iterdir()) == ["2", "3"]
    events = (tmp_path / "loop" / "tensorboard").glob("events.out.tfevents.*")
    assert len(list(events)) == 2  # training's, and the periodic evaluation's
    assert json.loads((tmp_path / "loop" / "eval" / "step_3.json").read_text())["bpd"] > 0


def test_misconfiguration_fails_fast_and_names_the_setting():
    with pytest.raises(ValueError, match="process_id"):
        distributed.check_settings("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="num_processes"):
        distributed.check_settings("127.0.0.1:1234", 0, 0)
    with pytest.raises(ValueError, match="coordinator_address"):
        distributed.check_settings("localhost", 2, 0)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"cannot reach the coordinator at 127\.0\.0\.1:\d+"):
        distributed.wait_for_coordinator(f"127.0.0.1:{free_port()}", timeout_s=2)
    assert time.monotonic() - start < 10
    with pytest.raises(ValueError, match="multiple of .* processes \\(3\\)"):
        config_lib.check_batch("training.batch_size", 8, 4, 3)
