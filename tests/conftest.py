"""Test session setup: four fake CPU devices, so multi-device code runs on one CPU."""

import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Must run before any JAX backend is initialised (DESIGN.md §4).
jax.config.update("jax_num_cpu_devices", 4)
# Tests build the same programs many times (a fresh Trainer per test): compile each once
# per session through a session-local persistent cache.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="ddpm_jax_xla_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


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
    """(config, model, params): configs/tiny.py with real MNIST and randomized parameters."""
    from ddpm_jax import config_lib, unet

    config = config_lib.load_config(ROOT / "configs" / "tiny.py")
    config.data.data_dir = str(ROOT.parent / "shared" / "tensorflow_datasets")
    model = unet.UNet(config_lib.unet_config(config))
    x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), x, t)["params"]
    return config, model, randomize(params, seed=1)
