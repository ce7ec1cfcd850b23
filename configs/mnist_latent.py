"""The packaged config ddpm_jax/configs/mnist_latent.py (also `--config mnist_latent`); its
docstring gives the commands. A variant imports a config and overrides it."""

from ddpm_jax.configs.mnist_latent import get_config  # noqa: F401
