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

import ml_collections

from ddpm_jax.configs import celeba_hq


def get_config():
    config = celeba_hq.get_config()
    config.stage = "autoencoder"
    del config.diffusion, config.sampling, config.autoencoder
    config.model = ml_collections.ConfigDict(
        dict(ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=3, norm_groups=32,
             mid_attention=True, dtype="float32", precision="default")
    )  # fmt: skip
    config.loss = ml_collections.ConfigDict(
        dict(rec="l1", kl_weight=1e-6, disc_start=50_001, disc_weight=0.5, disc_layers=3,
             disc_ch=64)
    )  # fmt: skip
    # LPIPS (lpips.py) with weight perceptual_weight, LDM's 1.0, needs its weights: a
    # folder with torchvision's vgg16-397923af.pth and LPIPS's vgg.pth (v0.1)
    config.loss.perceptual_weight = 0.0
    config.loss.lpips_weights = ""
    config.training.batch_size = 16
    config.training.learning_rate = 4.5e-6 * 16
    config.training.warmup_steps = 0
    config.training.num_steps = 200_000
    config.training.ema_decay = 0.999
    config.training.sample_every = 5_000  # grids of inputs above their reconstructions
    config.training.num_sample_images = 8
    config.eval.batch_size = 16
    config.eval.every = 10_000
    del config.eval.nll_batches, config.eval.fid_samples, config.eval.num_samples
    config.eval.psnr_batches = 16
    return config
