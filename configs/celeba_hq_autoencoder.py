"""The packaged config ddpm_jax/configs/celeba_hq_autoencoder.py (`--config celeba_hq_autoencoder`);
its docstring gives the commands. A variant imports a config and overrides it."""

from ddpm_jax.configs.celeba_hq_autoencoder import get_config  # noqa: F401
