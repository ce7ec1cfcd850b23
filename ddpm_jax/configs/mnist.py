"""A small MNIST model, the quickstart: recognisable digits within minutes on a 2-core CPU.

    python train.py --config mnist --workdir /tmp/ddpm_mnist

The paper's method and schedule (T = 1000, linear β, ε-prediction, L_simple) on a
U-Net shrunk to 28x28x1 images: ch 32, ch_mult (1, 1, 2), one residual block per
resolution, attention at 7x7; batch 32, Adam 1e-3, EMA 0.999 with warm-up (decay
min(0.999, (1 + n) / (10 + n)) at update n, so early grids show the model, not its
initialisation). MNIST is downloaded and prepared by TFDS on first use.
Measured on an idle 2-core CPU: 0.39 s a step, about 60 s for a grid of 16 samples; the
first grid (step 1500) is written 10.7 minutes after the command starts and shows mostly
recognisable digits (about 10 of 16).
"""

from ddpm_jax.configs import cifar


def get_config():
    config = cifar.get_config()
    config.data.dataset = "mnist"
    config.data.image_size = 28
    config.data.num_channels = 1
    config.data.random_flip = False
    config.data.shuffle_buffer = 10_000
    config.model.ch = 32
    config.model.ch_mult = (1, 1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (7,)
    config.model.dropout = 0.0
    config.training.batch_size = 32
    config.training.num_steps = 4_500
    config.training.learning_rate = 1e-3
    config.training.warmup_steps = 200
    config.training.ema_decay = 0.999
    config.training.ema_warmup = True
    config.training.log_every = 50
    config.training.checkpoint_every = 500
    config.training.keep_period = 0
    config.training.sample_every = 1_500
    config.training.num_sample_images = 16
    config.sampling.batch_size = 64
    config.eval.batch_size = 16
    config.eval.fid_split = "test"
    config.eval.every = 4_500  # the bound on 16 test images, ~1 minute on 2 CPU cores
    config.eval.fid_samples = 0  # 1000-step samples are slow on a CPU; FID via evaluate.py
    return config
