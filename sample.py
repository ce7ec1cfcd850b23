"""`python sample.py ...` runs `python -m ddpm_jax.sample ...` (ddpm_jax/sample.py)."""

from ddpm_jax import sample

if __name__ == "__main__":
    sample.run()
