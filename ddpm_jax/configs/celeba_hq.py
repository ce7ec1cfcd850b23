"""The paper's CelebA-HQ 256x256 run (Ho et al. 2020, Appendix B).

    python train.py --config celeba_hq --workdir /tmp/ddpm_celeba_hq

113,673,219 parameters (ch_mult 1,1,2,2,4,4); no dropout; σ²_t = β̃_t; Adam 2e-5;
batch 64; 0.5M steps; random flips. Data: TFDS celeb_a_hq/256, prepared by hand (TFDS
cannot download it). The paper shows samples (Fig. 1, 3); it reports no FID for it.
"""

from ddpm_jax.configs import cifar


def get_config():
    config = cifar.get_config()
    config.data.dataset = "celeb_a_hq/256"
    config.data.train_split = "train"
    config.data.eval_split = "train"
    config.data.image_size = 256
    config.data.shuffle_buffer = 2_000
    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.dropout = 0.0
    config.diffusion.var_type = "fixedsmall"
    config.training.batch_size = 64
    config.training.learning_rate = 2e-5
    config.training.num_steps = 500_000
    config.training.num_sample_images = 16
    config.sampling.batch_size = 16
    return config
