"""The paper's CIFAR10 run (Ho et al. 2020, §4 and Appendix B), exactly.

    python train.py --config cifar --workdir /tmp/ddpm_cifar10

35,746,307 parameters; T = 1000, linear β from 1e-4 to 0.02; ε-prediction with L_simple;
σ²_t = β_t for sampling; Adam 2e-4 with 5000 warmup steps, gradient clipping at 1.0;
batch 128; dropout 0.1; random horizontal flips; EMA 0.9999; 800k steps.
Expected (paper, Table 1): FID 3.17, IS 9.46, NLL ≤ 3.75 bits/dim (test); the paper's
TPU v3-8 ran 21 steps/s.
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "cifar10"  # a TFDS name, or "folder:/path/to/images"
    config.data.train_split = "train"
    config.data.eval_split = "test"
    config.data.data_dir = ml_collections.config_dict.placeholder(str)  # None: $TFDS_DATA_DIR
    config.data.image_size = 32
    config.data.num_channels = 3
    config.data.random_flip = True
    config.data.shuffle_buffer = 50_000

    config.model = ml_collections.ConfigDict()
    config.model.ch = 128
    config.model.ch_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.1
    config.model.resamp_with_conv = True
    config.model.dtype = "float32"  # computation; or "bfloat16" (parameters stay float32)
    # Convolutions and matmuls: "default", the platform's fast path (TF32 on NVIDIA GPUs,
    # bf16 passes on TPUs, exact on CPUs), or "highest", true float32 everywhere.
    config.model.precision = "default"
    config.model.num_classes = 0  # 0: unconditional; K: class-conditional on K classes

    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.beta_schedule = "linear"
    config.diffusion.beta_start = 1e-4
    config.diffusion.beta_end = 0.02
    config.diffusion.num_timesteps = 1000
    config.diffusion.mean_type = "eps"  # or "x0", "xprev", "v" (Salimans & Ho 2022)
    config.diffusion.var_type = "fixedlarge"  # or "fixedsmall", "learned_range" (Nichol & Dhariwal)
    config.diffusion.loss_type = "mse"  # or "l1", "kl" (the bound), "hybrid" (learned_range)
    config.diffusion.hybrid_lambda = 0.001  # λ of the hybrid loss L_simple + λ L_vlb

    config.training = ml_collections.ConfigDict()
    config.training.batch_size = 128  # global, over all devices and hosts
    config.training.num_steps = 800_000
    config.training.learning_rate = 2e-4
    config.training.warmup_steps = 5000
    config.training.grad_clip = 1.0
    config.training.ema_decay = 0.9999
    config.training.ema_warmup = False  # True: decay min(ema_decay, (1 + n) / (10 + n)) at update n
    config.training.timestep_sampler = "uniform"  # or "importance" (Nichol & Dhariwal §3.3)
    config.training.label_dropout = 0.0  # class models: P(label -> "no label"), for guidance
    config.training.log_every = 100
    config.training.checkpoint_every = 10_000
    config.training.keep_checkpoints = 3  # the last k ...
    config.training.keep_period = 100_000  # ... plus every multiple of this
    config.training.sample_every = 50_000
    config.training.num_sample_images = 64

    # Latent diffusion (Rombach et al. 2022): path "" is pixel space; a first stage's
    # training workdir or a diffusers AutoencoderKL folder runs the diffusion on its latents.
    config.autoencoder = ml_collections.ConfigDict()
    config.autoencoder.path = ""
    config.autoencoder.latent_size = 0  # the latents' side and channels the U-Net is built
    config.autoencoder.latent_channels = 0  # for (checked against the first stage's)
    config.autoencoder.scale = 0.0  # 0: the folder's scaling_factor, or 1/std of batch 1
    config.autoencoder.step = 0  # a first stage's workdir: its checkpoint; 0: the newest

    config.sampling = ml_collections.ConfigDict()
    config.sampling.clip_x0 = True
    config.sampling.batch_size = 256
    # Algorithm 2; "ddim" (Song et al. 2021); the solvers "dpm++2m", "dpm++3m", "sde-dpm++2m"
    config.sampling.method = "ancestral"
    config.sampling.eta = 0.0  # DDIM only: 0 deterministic, 1 ancestral-like
    config.sampling.num_steps = 0  # 0: all T steps; fewer: an evenly respaced chain
    config.sampling.spacing = "linspace"  # a solver's steps: "linspace", "leading", "trailing"
    config.sampling.guidance = 0.0  # class models: classifier-free guidance weight w

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 128  # global: bound and dataset-feature batches
    config.eval.num_samples = 50_000  # evaluate.py FID / IS samples, as the paper
    config.eval.fid_split = "train"  # the paper's FID reference set
    config.eval.inception_path = ml_collections.config_dict.placeholder(str)  # FID network file
    config.eval.stats_dir = ml_collections.config_dict.placeholder(str)  # None: ~/.cache/...
    config.eval.every = 50_000  # evaluate during training every this many steps; 0: never
    config.eval.nll_batches = 1  # ... the bound on this many eval batches (0: skip)
    config.eval.fid_samples = 1_000  # ... FID of this many samples, if inception_path is set
    return config
