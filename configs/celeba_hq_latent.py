"""The packaged config ddpm_jax/configs/celeba_hq_latent.py (`--config celeba_hq_latent`);
its docstring gives the commands. A variant imports a config and overrides it."""

from ddpm_jax.configs.celeba_hq_latent import get_config  # noqa: F401
