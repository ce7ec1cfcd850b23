"""`python evaluate.py ...` runs `python -m ddpm_jax.evaluate ...` (ddpm_jax/evaluate.py)."""

from ddpm_jax import evaluate

if __name__ == "__main__":
    evaluate.run()
