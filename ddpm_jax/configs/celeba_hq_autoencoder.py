"""The first stage of LDM-4 on CelebA-HQ 256x256 (Rombach et al. 2022, Tables 1, 8, 13).

    python train.py --config celeba_hq_autoencoder --workdir /tmp/ddpm_celeba_hq_autoencoder
    python evaluate.py --config celeba_hq_autoencoder \\
        --workdir /tmp/ddpm_celeba_hq_autoencoder --eval psnr,fid \\
        --config.eval.inception_path=/path/to/inception-2015-12-05.pt

LDM's f = 4 autoencoder ("kl-f4" layout: ch 128, ch_mult (1, 2, 4), two residual blocks
per level, attention in the middle, z_channels 3): 256x256x3 images to 64x64x3 latents.
Loss as LDM: L1 + 1e-6 KL + the patch discriminator (hinge, adaptive weight 0.5) from step
50,001, and LDM's LPIPS term with weight 1.0 once its weights are given:
--config.loss.perceptual_weight=1.0 --config.loss.lpips_weights=DIR (without them, L1
alone). LDM's CelebA-HQ model used a VQ-regularised f = 4 stage of the same latent
shape; this one is KL-regularised. LDM's learning rate is 4.5e-6 x batch (Adam β (0.5,
0.9) there; the training's Adam, β (0.9, 0.999), here). Data as celeba_hq.py: TFDS
celeb_a_hq/256, prepared by hand.
"""

from ddpm_jax.configs import celeba_hq
from ddpm_jax.configs._first_stage import first_stage


def get_config():
    config = first_stage(celeba_hq.get_config())  # LDM's kl-f4 layout
    config.loss.disc_weight = 0.5
    config.training.batch_size = 16
    config.training.learning_rate = 4.5e-6 * 16
    config.training.warmup_steps = 0
    config.training.num_steps = 200_000
    config.training.ema_decay = 0.999
    config.training.sample_every = 5_000  # grids of inputs above their reconstructions
    config.training.num_sample_images = 8
    config.eval.batch_size = 16
    config.eval.every = 10_000
    return config
