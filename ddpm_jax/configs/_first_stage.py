"""What makes a diffusion config (data, training, eval) a first stage's: the stage, the
autoencoder's settings as config.model and its loss as config.loss, with LDM's loss
weights as defaults; the diffusion-only settings removed. Not a config itself."""

import ml_collections


def first_stage(config, **model):
    """config (a diffusion config's data, training and eval) turned into a first stage
    with autoencoder.AutoencoderConfig(**model); config.loss holds LDM's weights, the
    discriminator off (disc_weight 0) and no LPIPS until its weights are given."""
    config.stage = "autoencoder"
    del config.diffusion, config.sampling, config.autoencoder
    defaults = dict(ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=3, norm_groups=32,
                    mid_attention=True, dtype="float32", precision="default")  # fmt: skip
    config.model = ml_collections.ConfigDict(defaults | model)
    config.loss = ml_collections.ConfigDict(
        dict(rec="l1", kl_weight=1e-6, disc_start=50_001, disc_weight=0.0, disc_layers=3,
             disc_ch=64)
    )  # fmt: skip
    # LPIPS (lpips.py) with weight perceptual_weight, LDM's 1.0, needs its weights: a
    # folder with torchvision's vgg16-397923af.pth and LPIPS's vgg.pth (v0.1)
    config.loss.perceptual_weight = 0.0
    config.loss.lpips_weights = ""
    del config.eval.nll_batches, config.eval.fid_samples, config.eval.num_samples
    config.eval.psnr_batches = 16  # PSNR (and FID of reconstructions) every eval.every
    return config
