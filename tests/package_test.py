"""The package as users get it: configs by name or path, the wheel installed in a fresh
virtual environment outside the repository (sample_fn from Python, training with
`python -m ddpm_jax.train`), TensorFlow kept off GPUs and out of `import ddpm_jax.sampling`.
The compilation cache across launches is checked in bucket_test.py."""

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tensorflow as tf
from conftest import mnist_data_dir

from ddpm_jax import checkpointing, config_lib, input_pipeline
from ddpm_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PACKAGED = ROOT / "ddpm_jax" / "configs"


def test_configs_by_name_and_by_path_are_the_same():
    for name in ("cifar", "tiny"):
        by_name = config_lib.load_config(name).to_dict()
        assert by_name == config_lib.load_config(ROOT / "configs" / f"{name}.py").to_dict()
        assert by_name == config_lib.load_config(PACKAGED / f"{name}.py").to_dict()
    assert config_lib.config_names() == sorted(p.stem for p in (ROOT / "configs").glob("*.py"))
    argv = ["train.py", "--config", "tiny", "--workdir", "w", "--config=cifar:x", "--other"]
    assert config_lib.resolve_config_flag(argv) == [
        "train.py", "--config", str(PACKAGED / "tiny.py"), "--workdir", "w",
        f"--config={PACKAGED / 'cifar.py'}:x", "--other",
    ]  # fmt: skip
    path = str(ROOT / "configs" / "tiny.py")
    assert config_lib.resolve_config_flag(["--config", path]) == ["--config", path]
    with pytest.raises(
        UserError, match="'cifa' is not a packaged config; .* cifar, cifar_improved, lsun_bedroom"
    ):
        config_lib.load_config("cifa")


def test_an_unknown_config_name_is_one_line(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), "--config=cifa", "--workdir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: config file 'cifa' does not exist, and 'cifa' is not")


def test_tensorflow_is_kept_off_gpus_before_a_dataset_opens(monkeypatch):
    calls = []
    monkeypatch.setattr(tf.config, "set_visible_devices", lambda *a: calls.append(a))
    config = config_lib.load_config("tiny")
    config.data.data_dir = str(mnist_data_dir())
    input_pipeline.load_split(config, "test")
    assert calls and all(call == ([], "GPU") for call in calls)


NO_TENSORFLOW = """
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):  # a machine without TensorFlow
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
            raise ImportError(f"no {name} here")
sys.meta_path.insert(0, Refuse())
import jax, numpy as np
from ddpm_jax import bound, config_lib, eval_modes, fid, sharding, train_state, training
setup = config_lib.build(config_lib.load_config("tiny"))
tx, mesh = train_state.make_optimizer(setup.training), sharding.make_mesh(jax.devices())
init = train_state.jit_init_state(setup, tx, mesh)
step = train_state.jit_train_step(setup, tx, mesh, jax.eval_shape(init))
x0 = np.random.default_rng(0).uniform(-1, 1, (setup.training.batch_size, 8, 8, 1))
state, metrics = step(init(), sharding.global_batch(x0.astype(np.float32), mesh))
assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
print("trained one step without TensorFlow")
"""


def test_training_and_evaluation_code_needs_no_tensorflow_until_data_is_read():
    """A GPU box may have no TensorFlow: the train step, evaluation and FID modules import
    and a train step runs on an array batch; only reading a dataset needs TensorFlow."""
    run = subprocess.run(
        [sys.executable, "-c", NO_TENSORFLOW], capture_output=True, text=True, cwd=ROOT
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "trained one step without TensorFlow" in run.stdout


def build_wheel(tmp_path):
    """The wheel, built from a copy of the package's sources (the checkout stays clean)."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "ddpm_jax", src / "ddpm_jax", ignore=shutil.ignore_patterns("__py*"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*cmd, "-w", str(tmp_path / "dist"), str(src)], check=True, cwd=tmp_path)
    [wheel] = (tmp_path / "dist").glob("ddpm_jax-*.whl")
    return wheel


COLAB = """
import sys, jax
from ddpm_jax import config_lib, sampling, unet
config = config_lib.load_config("tiny")
model = unet.UNet(config_lib.unet_config(config))
x, t = jax.numpy.zeros((1, 8, 8, 1)), jax.numpy.zeros((1,), "int32")
params = model.init(jax.random.PRNGKey(0), x, t)["params"]
images = sampling.make_sample_fn(config)(params, jax.random.PRNGKey(1), 3)
assert images.shape == (3, 8, 8, 1) and images.dtype == "uint8", images.shape
assert "tensorflow" not in sys.modules
print(sampling.__file__)
"""


def test_the_wheel_installs_and_runs_outside_the_repository(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "ddpm_jax/configs/cifar.py" in names and "ddpm_jax/train.py" in names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python)]  # this pip, that environment
    subprocess.run([*pip, "install", "-q", "--no-deps", wheel], check=True)
    # Its dependencies: this environment's packages (installing them anew needs the network).
    purelib = subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    )
    (Path(purelib.strip()) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    check = subprocess.run([*pip, "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout  # the wheel's dependency floors are met

    colab = subprocess.run([python, "-c", COLAB], capture_output=True, text=True, env=env,
                           cwd=tmp_path)  # fmt: skip
    assert colab.returncode == 0, colab.stderr[-2000:]
    assert colab.stdout.strip().startswith(str(venv))  # the installed copy, not the checkout
    cmd = [python, "-m", "ddpm_jax.train", "--config", "tiny", "--workdir", "run"]
    cmd += ["--config.training.num_steps=2", f"--config.data.data_dir={mnist_data_dir()}"]
    two_devices = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    train = subprocess.run(cmd, capture_output=True, text=True, env=two_devices, cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-2000:]
    assert checkpointing.steps(tmp_path / "run") == [2]
    assert all((venv / "bin" / f"ddpm-{tool}").is_file() for tool in ("sample", "evaluate"))
    usage = subprocess.run([venv / "bin" / "ddpm-train", "--help"], capture_output=True,
                           text=True, env=env)  # fmt: skip
    assert "Train a DDPM" in usage.stdout and "--workdir" in usage.stdout, usage.stderr[-2000:]
