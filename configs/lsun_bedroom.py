"""The packaged config ddpm_jax/configs/lsun_bedroom.py (also `--config lsun_bedroom`); its
docstring gives the command and the paper's numbers. A variant imports a config and overrides it."""

from ddpm_jax.configs.lsun_bedroom import get_config  # noqa: F401
