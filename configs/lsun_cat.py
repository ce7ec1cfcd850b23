"""The packaged config ddpm_jax/configs/lsun_cat.py (also `--config lsun_cat`); its docstring
gives the command and the paper's numbers. A variant imports a config and overrides it."""

from ddpm_jax.configs.lsun_cat import get_config  # noqa: F401
