"""Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel 2020) in JAX.

Import the submodules you need (`ddpm_jax.diffusion`, `ddpm_jax.schedules`, ...);
importing the package itself does nothing.
"""
