"""The paper's LSUN bedroom 256x256 run (Ho et al. 2020, Appendix B).

    python train.py --config lsun_bedroom --workdir /tmp/ddpm_lsun_bedroom

The CelebA-HQ network and optimiser (113,673,219 parameters, Adam 2e-5, batch 64),
2,400,000 steps, random flips: True.
Data: TFDS lsun/bedroom (center-cropped and resized to 256).
Expected (paper, Table 3): FID 6.36.
"""

from ddpm_jax.configs import celeba_hq


def get_config():
    config = celeba_hq.get_config()
    config.data.dataset = "lsun/bedroom"
    config.data.eval_split = "validation"
    config.data.random_flip = True
    config.training.num_steps = 2_400_000
    return config
