"""Nichol & Dhariwal 2021 ("Improved DDPM") on CIFAR10: learned variances, the hybrid loss.

    python train.py --config cifar_improved --workdir /tmp/ddpm_cifar10_improved

Their CIFAR10 setting: T = 4000 with the cosine schedule (their eq. 17), Σ_θ learned as
an interpolation between β_t and β̃_t (eq. 15), L_hybrid = L_simple + 0.001 L_vlb (eq. 16),
3 residual blocks per resolution, dropout 0.3, Adam 1e-4 without warmup, batch 128,
500k steps, EMA 0.9999. The network is this library's U-Net (the paper's, with
single-head attention at 16x16), with twice the output channels for Σ_θ. They report
likelihoods well below the paper's 3.70 bits/dim (about 2.94 at best, trained on the
bound alone with importance-sampled t: --config.diffusion.loss_type=kl
--config.training.timestep_sampler=importance), and with the hybrid loss samples that stay
good on a respaced chain of 50-100 steps (--config.sampling.num_steps=100, their §4).
"""

from ddpm_jax.configs import cifar


def get_config():
    config = cifar.get_config()
    config.model.num_res_blocks = 3
    config.model.dropout = 0.3
    config.diffusion.beta_schedule = "cosine"
    config.diffusion.num_timesteps = 4000
    config.diffusion.var_type = "learned_range"
    config.diffusion.loss_type = "hybrid"
    config.training.learning_rate = 1e-4
    config.training.warmup_steps = 0
    config.training.num_steps = 500_000
    return config
