"""LDM-4 on CelebA-HQ 256x256 (Rombach et al. 2022, Tables 1 and 13): DDPM on the 64x64x3
latents of celeba_hq_autoencoder.

    python train.py --config celeba_hq_autoencoder --workdir /tmp/ddpm_celeba_hq_autoencoder
    python train.py --config celeba_hq_latent --workdir /tmp/ddpm_celeba_hq_latent
    python evaluate.py --config celeba_hq_latent --workdir /tmp/ddpm_celeba_hq_latent \\
        --eval fid --config.eval.inception_path=/path/to/inception-2015-12-05.pt

LDM's settings: T = 1000 with its "linear" schedule (our "scaled_linear": √β evenly from
√0.0015 to √0.0195, squared), ε-prediction, L_simple; a U-Net of ch 224, ch_mult
(1, 2, 3, 4), two residual blocks per level, attention at 32, 16 and 8 in heads of 32
channels; batch 48, constant learning rate 9.6e-5, 410k steps; latents scaled by 1/std of
the first batch's. Sampling as LDM's reported FID: 500 DDIM steps (η = 0). LDM reports
FID 5.11 (precision 0.72, recall 0.49) for LDM-4 with its VQ-f4 first stage and its U-Net
(274M parameters); this U-Net is the DDPM one at LDM's sizes.
"""

from ddpm_jax.configs import celeba_hq


def get_config():
    config = celeba_hq.get_config()
    config.autoencoder.path = "/tmp/ddpm_celeba_hq_autoencoder"
    config.autoencoder.latent_size = 64
    config.autoencoder.latent_channels = 3
    config.model.ch = 224
    config.model.ch_mult = (1, 2, 3, 4)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (32, 16, 8)
    config.model.attn_head_dim = 32
    config.model.dropout = 0.0
    config.diffusion.beta_schedule = "scaled_linear"
    config.diffusion.beta_start = 0.0015
    config.diffusion.beta_end = 0.0195
    config.diffusion.var_type = "fixedsmall"
    config.training.batch_size = 48
    config.training.learning_rate = 9.6e-5
    config.training.warmup_steps = 0
    config.training.num_steps = 410_000
    config.sampling.clip_x0 = False  # latents are not bounded as pixels
    config.sampling.method = "ddim"
    config.sampling.num_steps = 500
    return config
