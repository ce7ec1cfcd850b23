"""The packaged config ddpm_jax/configs/celeba_hq.py (also `--config celeba_hq`); its docstring
gives the command and the paper's numbers. A variant imports a config and overrides it."""

from ddpm_jax.configs.celeba_hq import get_config  # noqa: F401
