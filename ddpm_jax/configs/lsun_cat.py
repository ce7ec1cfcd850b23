"""The paper's LSUN cat 256x256 run (Ho et al. 2020, Appendix B).

    python train.py --config lsun_cat --workdir /tmp/ddpm_lsun_cat

The CelebA-HQ network and optimiser (113,673,219 parameters, Adam 2e-5, batch 64),
1,800,000 steps, random flips: False.
Data: TFDS lsun/cat (center-cropped and resized to 256).
Expected (paper, Table 3): FID 19.75.
"""

from ddpm_jax.configs import celeba_hq


def get_config():
    config = celeba_hq.get_config()
    config.data.dataset = "lsun/cat"
    config.data.eval_split = "train"  # LSUN object categories have no other split
    config.data.random_flip = False
    config.training.num_steps = 1_800_000
    return config
