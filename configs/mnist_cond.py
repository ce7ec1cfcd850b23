"""The packaged config ddpm_jax/configs/mnist_cond.py (also `--config mnist_cond`); its
docstring gives the command and the numbers to expect. A variant imports a config and
overrides it."""

from ddpm_jax.configs.mnist_cond import get_config  # noqa: F401
