"""The packaged config ddpm_jax/configs/tiny.py (also `--config tiny`); its docstring
gives the command and the paper's numbers. A variant imports a config and overrides it."""

from ddpm_jax.configs.tiny import get_config  # noqa: F401
