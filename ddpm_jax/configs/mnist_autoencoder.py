"""The first stage of a latent MNIST model (Rombach et al. 2022), CPU-sized.

    python train.py --config mnist_autoencoder --workdir /tmp/ddpm_mnist_autoencoder
    python evaluate.py --config mnist_autoencoder --workdir /tmp/ddpm_mnist_autoencoder \\
        --eval psnr

A KL-regularised autoencoder as LDM's (autoencoder.py): 28x28 digits padded with black to
32x32, f = 4 (ch 16, ch_mult (1, 2, 4), one residual block per level), z_channels 4: 8x8x4
latents, 256 numbers for 1024 pixels. Loss: L1 summed over the
pixels + 1e-6 KL; the patch discriminator is off (disc_weight 0; LDM switches it on after
50k steps, beyond this budget). Then mnist_latent trains DDPM on its latents.
"""

from ddpm_jax.configs import mnist
from ddpm_jax.configs._first_stage import first_stage


def get_config():
    config = first_stage(mnist.get_config(), ch=16, num_res_blocks=1, z_channels=4, norm_groups=8)
    config.data.image_size = 32
    config.data.pad = True  # 28 -> 32: centred on black
    config.loss.update(disc_layers=2, disc_ch=32)
    config.training.num_steps = 3_000
    config.training.learning_rate = 5e-4
    config.training.sample_every = 1_000  # grids of inputs above their reconstructions
    config.training.checkpoint_every = 500
    config.eval.batch_size = 64
    config.eval.every = 1_000
    config.eval.psnr_batches = 10  # 640 test digits
    return config
