"""`python train.py ...` runs `python -m ddpm_jax.train ...` (ddpm_jax/train.py)."""

from ddpm_jax import train

if __name__ == "__main__":
    train.run()
