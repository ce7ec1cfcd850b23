"""The packaged config ddpm_jax/configs/mnist_autoencoder.py (`--config mnist_autoencoder`);
its docstring gives the commands. A variant imports a config and overrides it."""

from ddpm_jax.configs.mnist_autoencoder import get_config  # noqa: F401
