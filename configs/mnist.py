"""The packaged config ddpm_jax/configs/mnist.py (also `--config mnist`); its docstring
gives the command and the paper's numbers. A variant imports a config and overrides it."""

from ddpm_jax.configs.mnist import get_config  # noqa: F401
