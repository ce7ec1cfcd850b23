"""The packaged config ddpm_jax/configs/cifar_improved.py (also `--config cifar_improved`); its
docstring gives the command and the numbers to expect. A variant imports a config and
overrides it."""

from ddpm_jax.configs.cifar_improved import get_config  # noqa: F401
