"""The packaged config ddpm_jax/configs/lsun_church.py (also `--config lsun_church`); its docstring
gives the command and the paper's numbers. A variant imports a config and overrides it."""

from ddpm_jax.configs.lsun_church import get_config  # noqa: F401
