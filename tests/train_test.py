"""train.py end to end on the tiny config: checkpoints, TensorBoard events, a sample grid."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import fid_file, mnist_data_dir
from PIL import Image

from ddpm_jax import checkpointing, config_lib, training

ROOT = Path(__file__).resolve().parents[1]


def train_command(workdir, *overrides, prefix=()):
    """(command, environment) of train.py on the tiny config, with two devices."""
    cmd = [*prefix, sys.executable, str(ROOT / "train.py")]
    cmd += ["--config", str(ROOT / "configs" / "tiny.py")]
    cmd += ["--workdir", str(workdir), f"--config.data.data_dir={mnist_data_dir()}", *overrides]
    return cmd, dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")


def run_train(workdir, *overrides, prefix=()):
    cmd, env = train_command(workdir, *overrides, prefix=prefix)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def test_train_py_writes_checkpoints_events_and_samples(tmp_path):
    result = run_train(
        tmp_path, "--config.training.num_steps=4", "--config.training.sample_every=4"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "4"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    grid = np.asarray(Image.open(tmp_path / "samples" / "step_00000004.png"))
    assert grid.shape == (16, 16) and grid.dtype == np.uint8  # 4 samples of 8x8, 2x2 grid
    assert "step 4: loss" in result.stderr
    assert f"finished at step 4; its checkpoint is {tmp_path / 'checkpoints' / '4'}" in (
        result.stderr
    )
    assert "did not fully read the dataset" not in result.stderr  # tf.data's cache warning


def test_train_py_rejects_a_bad_override_at_once(tmp_path):
    result = run_train(tmp_path, "--config.training.batch_size=3")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "error: training.batch_size=3 must be a positive multiple of the number of devices (2)"
        )
    )
    assert not (tmp_path / "checkpoints").exists()


def test_evaluate_py_writes_the_bound_and_fids(tmp_path):
    # A checkpoint written from this process's 4 devices, evaluated by a 2-device process.
    config = config_lib.load_config(ROOT / "configs" / "tiny.py")
    config.data.data_dir = str(mnist_data_dir())
    manager = checkpointing.make_manager(tmp_path)
    state = training.Trainer(config, tmp_path).init()
    checkpointing.save(manager, state.replace(step=state.step + 2), config)
    manager.wait_until_finished()
    cmd = [sys.executable, str(ROOT / "evaluate.py"), "--config", str(ROOT / "configs" / "tiny.py")]
    cmd += ["--workdir", str(tmp_path), f"--config.data.data_dir={config.data.data_dir}"]
    cmd += ["--batch_size=4"]
    cmd += ["--max_batches=2", "--eval=nll,fid,kid,pr,fid_data", "--num_samples=4"]
    cmd += ["--config.eval.fid_split=test[:4]", "--other_split=test[4:8]"]
    cmd += [f"--config.eval.inception_path={fid_file()}"]
    cmd += [f"--config.eval.stats_dir={tmp_path / 'stats'}"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "eval" / "step_2.json").read_text())
    assert summary["num_examples"] == 8 and summary["bpd"] > summary["decoder_bpd"] > 0
    assert summary["num_samples"] == 4 and summary["fid"] > summary["fid_data"] > 0
    assert summary["fid_reference"] == "mnist test[:4]" and summary["fid_data_examples"] == 4
    assert summary["kid_std"] >= 0 and np.isfinite(summary["kid"])  # from the same pass
    assert 0 <= summary["precision"] <= 1 and 0 <= summary["recall"] <= 1
    arrays = np.load(tmp_path / "eval" / "nll_step_2.npz")
    assert arrays["terms_bpd"].shape == (20,)
    np.testing.assert_allclose(arrays["rate_bpd"][0], summary["bpd"], rtol=1e-5)
    assert (tmp_path / "eval" / "rate_distortion_step_2.png").is_file()
    assert len(list((tmp_path / "stats").glob("*.npz"))) == 2
    out = tmp_path / "eval"
    assert done.stderr.strip().splitlines()[-1] == (
        f"evaluated step 2; wrote {out / 'step_2.json'}, {out / 'nll_step_2.npz'}, "
        f"{out / 'rate_distortion_step_2.png'}"
    )
