"""The first stage of latent diffusion (Rombach et al. 2022, §3.1 and Appendix G): a
KL-regularised convolutional autoencoder with the U-Net's blocks.

The encoder maps x (B, H, W, C) through `len(ch_mult)` levels of residual blocks (a
stride-2 convolution between levels, so f = 2^(len(ch_mult) - 1)), a middle block with
self-attention, GroupNorm, swish and a convolution to 2 z_channels, then a 1x1 `quant_conv`:
the mean and log-variance of a diagonal Gaussian posterior q(z | x) on an (H/f, W/f,
z_channels) grid (log σ² clipped to [-30, 20]). The decoder mirrors it from z (a 1x1
`post_quant_conv` first), with num_res_blocks + 1 blocks per level and nearest-neighbour
upsampling. The layout is LDM's and Stable Diffusion's (diffusers' AutoencoderKL), so
their weights map one to one (diffusers_vae.py).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax import unet


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture of the first stage; the defaults are Stable Diffusion's VAE (f = 8)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    out_ch: int = 3  # image channels (also the encoder's input)
    norm_groups: int = 32
    mid_attention: bool = True
    dtype: str = "float32"
    precision: str = "default"

    def __post_init__(self):
        if self.z_channels < 1:
            raise ValueError(f"z_channels must be >= 1, got {self.z_channels}")
        self.blocks()  # the shared checks: widths, groups, dtype, precision

    @property
    def factor(self) -> int:
        """f: the image side over the latent side."""
        return 2 ** (len(self.ch_mult) - 1)

    def blocks(self) -> unet.UNetConfig:
        """The settings of the U-Net's blocks these are built of (ε = 1e-6, one head)."""
        return unet.UNetConfig(
            ch=self.ch, ch_mult=self.ch_mult, num_res_blocks=self.num_res_blocks,
            attn_resolutions=(), dropout=0.0, norm_groups=self.norm_groups, norm_eps=1e-6,
            dtype=self.dtype, precision=self.precision,
        )  # fmt: skip

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        h, w, _ = image_shape
        if h % self.factor or w % self.factor:
            raise ValueError(f"image size {h}x{w} must be divisible by f = {self.factor}")
        return h // self.factor, w // self.factor, self.z_channels


class Level(unet._Layers):
    """One resolution of the encoder (num_res_blocks blocks, then downsampling unless the
    last) or of the decoder (num_res_blocks + 1 blocks, then upsampling unless level 0)."""

    level: int = 0
    up: bool = False

    @nn.compact
    def __call__(self, h):
        cfg = self.config
        width = cfg.ch * cfg.ch_mult[self.level]
        for i in range(cfg.num_res_blocks + self.up):
            h = self.sub(unet.ResnetBlock, f"block_{i}", out_ch=width)(h, None, False)
        if self.up and self.level != 0:
            return self.sub(unet.Resample, "upsample", up=True)(h)
        if not self.up and self.level != len(cfg.ch_mult) - 1:
            return self.sub(unet.Resample, "downsample")(h)
        return h


class Encoder(unet._Layers):
    """x -> 2 z_channels (mean and log-variance before quant_conv)."""

    z_channels: int = 4
    mid_attention: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = self.conv(cfg.ch, "conv_in")(x)
        for level in range(len(cfg.ch_mult)):
            h = self.sub(Level, f"down_{level}", level=level)(h)
        h = self.sub(unet.Middle, "mid", attention=self.mid_attention)(h, None, False)
        h = nn.swish(self.norm("norm_out")(h))
        return self.conv(2 * self.z_channels, "conv_out")(h)


class Decoder(unet._Layers):
    """z (after post_quant_conv) -> an image of out_ch channels."""

    out_ch: int = 3
    mid_attention: bool = True

    @nn.compact
    def __call__(self, z, features_only=False):
        cfg = self.config
        h = self.conv(cfg.ch * cfg.ch_mult[-1], "conv_in")(z)
        h = self.sub(unet.Middle, "mid", attention=self.mid_attention)(h, None, False)
        for level in reversed(range(len(cfg.ch_mult))):
            for i in range(cfg.num_res_blocks + 1):
                width = cfg.ch * cfg.ch_mult[level]
                h = self.sub(unet.ResnetBlock, f"up_{level}/block_{i}", out_ch=width)(
                    h, None, False
                )
            if level != 0:
                h = self.sub(unet.Resample, f"up_{level}/upsample", up=True)(h)
        h = nn.swish(self.norm("norm_out")(h))
        return h if features_only else self.conv(self.out_ch, "conv_out")(h)


class Autoencoder(nn.Module):
    """`encode(x)` -> (mean, logvar) of q(z | x); `decode(z)` -> x̂; `__call__(x, rng)` ->
    (x̂ of a posterior sample, or of the mean without rng, mean, logvar). Outputs are
    float32 whatever the computation dtype."""

    config: AutoencoderConfig = AutoencoderConfig()

    def setup(self):
        cfg, blocks = self.config, self.config.blocks()
        dtype, precision = unet.DTYPES[cfg.dtype], unet.PRECISIONS[cfg.precision]
        z = cfg.z_channels
        self.encoder = Encoder(dtype, precision, blocks, z, cfg.mid_attention)
        self.decoder = Decoder(dtype, precision, blocks, cfg.out_ch, cfg.mid_attention)
        conv1x1 = lambda n, name: nn.Conv(n, (1, 1), dtype=dtype, precision=precision, name=name)  # noqa: E731
        self.quant_conv, self.post_quant_conv = (
            conv1x1(2 * z, "quant_conv"),
            conv1x1(z, "post_quant_conv"),
        )

    def encode(self, x):
        moments = self.quant_conv(self.encoder(x.astype(unet.DTYPES[self.config.dtype])))
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        h = self.post_quant_conv(z.astype(unet.DTYPES[self.config.dtype]))
        return self.decoder(h).astype(jnp.float32)

    def decode_features(self, z):
        """The decoder's activations before its last layer (last_layer applies it)."""
        return self.decoder(self.post_quant_conv(z.astype(unet.DTYPES[self.config.dtype])), True)

    def __call__(self, x, rng=None):
        mean, logvar = self.encode(x)
        z = mean if rng is None else sample_posterior(rng, mean, logvar)
        return self.decode(z), mean, logvar


def last_layer(config: AutoencoderConfig):
    """(w, h) -> x̂: the decoder's conv_out with parameters w (params["decoder"]["conv_out"])
    on decode_features' h, so that decode(z) = last_layer(config)(w, decode_features(z))."""
    dtype, precision = unet.DTYPES[config.dtype], unet.PRECISIONS[config.precision]
    layer = unet.conv(config.out_ch, "conv_out", dtype, precision)
    return lambda w, h: layer.apply({"params": w}, h).astype(jnp.float32)


def sample_posterior(rng, mean, logvar) -> jax.Array:
    """z = μ + σ ε, ε ~ N(0, I): a draw of the diagonal Gaussian q(z | x)."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def kl(mean, logvar) -> jax.Array:
    """KL(q(z | x) || N(0, I)) per example, summed over the latent grid:
    ½ Σ (μ² + σ² - 1 - log σ²)."""
    return 0.5 * jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
