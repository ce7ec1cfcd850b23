"""The MNIST quickstart with Nichol & Dhariwal's changes: a CPU-sized check of learned Σ_θ.

    python train.py --config mnist_improved --workdir /tmp/ddpm_mnist_improved

configs/mnist.py with the cosine schedule, Σ_θ learned as an interpolation between β_t
and β̃_t and the hybrid loss (as configs/cifar_improved.py), T = 1000. Sample with a
respaced chain, e.g. --config.sampling.num_steps=50.
"""

from ddpm_jax.configs import mnist


def get_config():
    config = mnist.get_config()
    config.diffusion.beta_schedule = "cosine"
    config.diffusion.var_type = "learned_range"
    config.diffusion.loss_type = "hybrid"
    return config
