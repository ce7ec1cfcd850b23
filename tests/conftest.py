"""Test session setup: four fake CPU devices, so multi-device code runs on one CPU."""

import tempfile

import jax
import pytest

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
