"""The paper's LSUN church 256x256 run (Ho et al. 2020, Appendix B).

    python train.py --config lsun_church --workdir /tmp/ddpm_lsun_church

The CelebA-HQ network and optimiser (113,673,219 parameters, Adam 2e-5, batch 64),
1,200,000 steps, random flips: True.
Data: TFDS lsun/church_outdoor (center-cropped and resized to 256).
Expected (paper, Table 3): FID 7.89.
"""

from ddpm_jax.configs import celeba_hq


def get_config():
    config = celeba_hq.get_config()
    config.data.dataset = "lsun/church_outdoor"
    config.data.eval_split = "validation"
    config.data.random_flip = True
    config.training.num_steps = 1_200_000
    return config
