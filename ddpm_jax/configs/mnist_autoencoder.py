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

import ml_collections

from ddpm_jax.configs import mnist


def get_config():
    config = mnist.get_config()
    config.stage = "autoencoder"
    del config.diffusion, config.sampling, config.autoencoder
    config.data.image_size = 32
    config.data.pad = True  # 28 -> 32: centred on black
    config.model = ml_collections.ConfigDict(
        dict(ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, z_channels=4, norm_groups=8,
             mid_attention=True, dtype="float32", precision="default")
    )  # fmt: skip
    config.loss = ml_collections.ConfigDict(
        dict(rec="l1", kl_weight=1e-6, disc_start=50_001, disc_weight=0.0, disc_layers=2,
             disc_ch=32)
    )  # fmt: skip
    # LPIPS (lpips.py) with weight perceptual_weight, LDM's 1.0, needs its weights: a
    # folder with torchvision's vgg16-397923af.pth and LPIPS's vgg.pth (v0.1)
    config.loss.perceptual_weight = 0.0
    config.loss.lpips_weights = ""
    config.training.num_steps = 3_000
    config.training.learning_rate = 5e-4
    config.training.sample_every = 1_000  # grids of inputs above their reconstructions
    config.training.checkpoint_every = 500
    config.eval.batch_size = 64
    config.eval.every = 1_000
    del config.eval.nll_batches, config.eval.fid_samples, config.eval.num_samples
    config.eval.psnr_batches = 10  # PSNR (and FID of reconstructions) on 640 test digits
    return config
