"""The packaged config ddpm_jax/configs/pretrained.py (also `--config pretrained:FOLDER`);
its docstring gives the commands."""

from ddpm_jax.configs.pretrained import get_config  # noqa: F401
