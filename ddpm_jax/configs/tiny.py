"""A tiny configuration for tests: 8x8 single-channel images, T = 20, a 2-level U-Net.

    python train.py --config tiny --workdir /tmp/ddpm_tiny

Learns nothing useful; it exercises every code path in seconds.
"""

from ddpm_jax.configs import mnist


def get_config():
    config = mnist.get_config()
    config.data.image_size = 8
    config.data.shuffle_buffer = 100
    config.model.ch_mult = (1, 2)
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.1
    config.diffusion.num_timesteps = 20
    config.diffusion.beta_end = 0.2
    config.training.batch_size = 8
    config.training.num_steps = 6
    config.training.warmup_steps = 2
    config.training.log_every = 2
    config.training.checkpoint_every = 3
    config.training.keep_checkpoints = 2
    config.training.sample_every = 6
    config.training.num_sample_images = 4
    config.sampling.batch_size = 4
    config.eval.batch_size = 8
    config.eval.num_samples = 8
    config.eval.nll_batches = 1
    config.eval.fid_samples = 8
    return config
