"""Test session setup: four fake CPU devices, so multi-device code runs on one CPU; the
test assets (real MNIST, the FID network files) from environment variables.

TFDS_DATA_DIR: a TFDS data dir with MNIST prepared (`python -m ddpm_jax.data prepare mnist
--data_dir DIR`). DDPM_FID_DIR: inception-2015-12-05.pt and the reference outputs. Tests
that need an absent asset are skipped, saying how to get it; with DDPM_REQUIRE_ASSETS=1
(CI) every skip is a failure instead. Likewise on a machine without TensorFlow (a GPU
box that only trains and samples): what reads a dataset is skipped, the rest runs.
"""

import importlib.util
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Must run before any JAX backend is initialised.
jax.config.update("jax_num_cpu_devices", 4)
# Tests build the same programs many times (a fresh Trainer per test): compile each once
# per session through a session-local persistent cache.
CACHE = tempfile.mkdtemp(prefix="ddpm_jax_xla_cache_")
jax.config.update("jax_compilation_cache_dir", CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
os.environ["DDPM_COMPILATION_CACHE"] = CACHE  # the entry points run by tests share it
# Tests compare numbers at float32 tolerances: every matmul and convolution of the tests
# and of the library in true float32, also on GPUs (whose default is TF32) and TPUs.
jax.config.update("jax_default_matmul_precision", "highest")


REQUIRE_ASSETS = os.environ.get("DDPM_REQUIRE_ASSETS") == "1"


def _importable(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


TENSORFLOW = _importable("tensorflow") and _importable("tensorflow_datasets")
NO_TENSORFLOW = "needs TensorFlow (it reads a dataset): pip install -r requirements.txt"


def _missing_tensorflow(longrepr):
    """Whether a failure is TensorFlow's absence (on a machine that has none)."""
    return not TENSORFLOW and "No module named 'tensorflow" in str(longrepr)


def mnist_data_dir():
    """$TFDS_DATA_DIR if MNIST is prepared there; otherwise the calling test is skipped."""
    data_dir = os.environ.get("TFDS_DATA_DIR")
    if not data_dir or not (Path(data_dir) / "mnist").is_dir():
        pytest.skip(
            "needs real MNIST: run `python -m ddpm_jax.data prepare mnist --data_dir DIR` "
            "once, then set TFDS_DATA_DIR=DIR"
        )
    return Path(data_dir)


def fid_file(name="inception-2015-12-05.pt"):
    """A file of $DDPM_FID_DIR (the FID network and its reference outputs), else skip."""
    fid_dir = os.environ.get("DDPM_FID_DIR")
    if not fid_dir or not (Path(fid_dir) / name).is_file():
        pytest.skip(
            f"needs {name} in $DDPM_FID_DIR: the FID Inception network file (README, "
            f"'FID and IS') and the reference outputs made from it"
        )
    return Path(fid_dir) / name


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A test module that imports TensorFlow, where there is none: skipped (failed under
    DDPM_REQUIRE_ASSETS=1)."""
    report = (yield).get_result()
    if report.failed and not REQUIRE_ASSETS and _missing_tensorflow(report.longrepr):
        report.outcome, report.longrepr = "skipped", (str(collector.path), 0, NO_TENSORFLOW)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under DDPM_REQUIRE_ASSETS=1 a skipped test counts as failed; without it, a test that
    fails for want of TensorFlow is skipped."""
    report = (yield).get_result()
    if report.failed and not REQUIRE_ASSETS and _missing_tensorflow(report.longrepr):
        report.outcome, report.longrepr = "skipped", (str(item.path), 0, NO_TENSORFLOW)
    if REQUIRE_ASSETS and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped, but DDPM_REQUIRE_ASSETS=1: {report.longrepr}"


@pytest.fixture(params=["float32", "x64"])
def precision(request):
    """Run a test in float32 and again with jax_enable_x64; yields the relative tolerance."""
    if request.param == "x64":
        with jax.enable_x64(True):
            yield 1e-6
    else:
        yield 2e-5


def randomize(params, seed=5, scale=0.05):
    """Every parameter moved by scale·N(0, 1), so zero-initialised layers matter too."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return tree.unflatten(
        [a + scale * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    )


@pytest.fixture(scope="module")
def tiny_model():
    """(config, model, params): configs/tiny.py (data from $TFDS_DATA_DIR) and randomized
    parameters."""
    from ddpm_jax import config_lib, unet

    config = config_lib.load_config(ROOT / "configs" / "tiny.py")
    config.data.data_dir = os.environ.get("TFDS_DATA_DIR")
    model = unet.UNet(config_lib.unet_config(config))
    x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), x, t)["params"]
    return config, model, randomize(params, seed=1)
