"""The packaged config ddpm_jax/configs/cifar.py (also `--config cifar`); its docstring
gives the command and the paper's numbers. A variant imports a config and overrides it."""

from ddpm_jax.configs.cifar import get_config  # noqa: F401
