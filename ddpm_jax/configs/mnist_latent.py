"""DDPM on the latents of mnist_autoencoder (latent diffusion, Rombach et al. 2022).

    python train.py --config mnist_autoencoder --workdir /tmp/ddpm_mnist_autoencoder
    python train.py --config mnist_latent --workdir /tmp/ddpm_mnist_latent
    python sample.py --config mnist_latent --workdir /tmp/ddpm_mnist_latent --out /tmp/s

The quickstart's training (mnist.py: batch 32, Adam 1e-3, 4500 steps, EMA 0.999 with
warm-up) on 8x8x4 latents of the 32x32 padded digits, scaled by 1/std of the first batch's
latents; the U-Net has two levels (8x8 and 4x4, attention at 4x4), ch 64. Samples are
decoded by the first stage; --config.autoencoder.path names another one (its latents must
be 8x8x4).
"""

from ddpm_jax.configs import mnist


def get_config():
    config = mnist.get_config()
    config.data.image_size = 32
    config.data.pad = True
    config.autoencoder.path = "/tmp/ddpm_mnist_autoencoder"
    config.autoencoder.latent_size = 8
    config.autoencoder.latent_channels = 4
    config.model.ch = 64
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (4,)
    config.sampling.clip_x0 = False  # latents are not bounded as pixels
    config.diffusion.var_type = "fixedsmall"  # σ²_t = β̃_t, as LDM samples
    return config
