"""The ε_θ network of DDPM (Ho et al. 2020, §4 and Appendix B) as a Flax Linen module.

A PixelCNN++-style U-Net: sinusoidal timestep embedding, residual blocks with GroupNorm and
swish, single-head self-attention at the listed resolutions, stride-2 conv downsampling
and nearest-neighbour upsampling. Module and parameter names mirror the authors' variable
scopes (temb/dense0, down_0/block_0/conv1, mid/attn_1, up_3/upsample/conv, norm_out, ...),
so their checkpoints map one to one (see convert.py). Knows nothing of noise schedules.
"""

import dataclasses
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Of the convolutions and matmuls: "default" is the platform's fast path (TF32 on NVIDIA
# GPUs since Ampere, bf16 passes on TPUs; exact float32 on CPUs), "highest" true float32.
PRECISIONS = {"default": None, "highest": jax.lax.Precision.HIGHEST}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture hyperparameters; the defaults are the paper's CIFAR10 model (35.7M)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    out_ch: int = 3
    dtype: str = "float32"  # computation dtype; parameters are always float32
    precision: str = "default"  # of convolutions and matmuls: "default" or "highest"
    num_classes: int = 0  # 0: unconditional (the paper); > 0: a class embedding
    # Options of diffusers' UNet2DModel (diffusers_io.py); the defaults are the paper's.
    norm_groups: int = 32  # GroupNorm groups
    norm_eps: float = 1e-6  # GroupNorm ε (tf.contrib's default)
    attn_head_dim: int = 0  # channels per attention head; 0: one head (the paper)
    scale_shift: bool = False  # time as norm2(h)(1 + s) + b, not h + b before norm2
    downsample_pad: str = "same"  # "same": 0 before, 1 after (TF); "symmetric": 1 each side
    time_flip: bool = False  # the time embedding as [cos, sin] instead of [sin, cos]
    time_shift: float = 1.0  # its frequencies exp(-ln(1e4) i / (half - time_shift))
    mid_attn_groups: int = 0  # GroupNorm groups of the middle attention: 0 = norm_groups,
    # -1: no norm there (diffusers' scale_shift models)

    def __post_init__(self):
        if self.norm_groups < 1 or self.ch < 1 or self.ch % self.norm_groups:
            raise ValueError(
                f"ch must be a positive multiple of norm_groups ({self.norm_groups} GroupNorm "
                f"groups), got {self.ch}"
            )
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ValueError(
                f"ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}"
            )
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
            raise ValueError(f"num_classes must be an integer >= 0, got {self.num_classes!r}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {self.num_classes}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {tuple(PRECISIONS)}, got {self.precision!r}"
            )
        self._check_diffusers_options()

    def _check_diffusers_options(self):
        widths = sorted({self.ch * m for m in self.ch_mult})
        if self.attn_head_dim < 0 or any(w % (self.attn_head_dim or w) for w in widths):
            raise ValueError(
                f"attn_head_dim must be 0 (one head) or divide every width {widths}, "
                f"got {self.attn_head_dim}"
            )
        if self.downsample_pad not in ("same", "symmetric"):
            raise ValueError(
                f"downsample_pad must be 'same' or 'symmetric', got {self.downsample_pad!r}"
            )
        groups = self.mid_attn_groups
        if groups < -1 or (groups > 0 and widths[-1] % groups) or not self.norm_eps > 0:
            raise ValueError(
                f"mid_attn_groups must be -1, 0 or divide {widths[-1]}, and norm_eps > 0; got "
                f"{groups}, {self.norm_eps}"
            )

    def check_image_size(self, size: int) -> None:
        """Raise ValueError unless `size` halves cleanly at every downsampling."""
        factor = 2 ** (len(self.ch_mult) - 1)
        if size % factor:
            raise ValueError(
                f"image size {size} must be divisible by {factor} = 2^(len(ch_mult) - 1) "
                f"for ch_mult={self.ch_mult}; change the image size or ch_mult"
            )


def default_init(scale: float = 1.0) -> Callable:
    """Variance scaling, fan-average, uniform (the authors' init); scale 0 gives zeros."""
    if scale == 0.0:
        return nn.initializers.zeros
    return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def timestep_embedding(t: jax.Array, dim: int, flip: bool = False, shift: float = 1.0) -> jax.Array:
    """Sinusoidal embedding [sin(t·f_i), cos(t·f_i)], f_i = exp(-ln(1e4)·i/(half-shift));
    the authors' has shift 1; flip gives [cos, sin] (diffusers' flip_sin_to_cos)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) / (half - shift) * jnp.arange(half, dtype=jnp.float32))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    parts = [jnp.cos(args), jnp.sin(args)] if flip else [jnp.sin(args), jnp.cos(args)]
    return jnp.pad(jnp.concatenate(parts, axis=1), ((0, 0), (0, dim % 2)))


def conv(
    features: int, name: str, dtype, precision=None, stride: int = 1, scale: float = 1.0
) -> nn.Conv:
    """3x3 'SAME' convolution (TF's SAME padding, as the authors' checkpoints expect)."""
    return nn.Conv(
        features, (3, 3), (stride, stride), "SAME",
        dtype=dtype, precision=precision, kernel_init=default_init(scale), name=name,
    )  # fmt: skip


def dense(features: int, name: str, dtype, precision=None, scale: float = 1.0) -> nn.Dense:
    """Dense layer on the last axis (also the 1x1 'nin' layers of the authors' code)."""
    return nn.Dense(
        features, dtype=dtype, precision=precision, kernel_init=default_init(scale), name=name
    )


def group_norm(name: str, dtype, groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm; 32 groups and ε = 1e-6 are tf.contrib.layers.group_norm's defaults."""
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, name=name)


class _Layers(nn.Module):
    """Base of the blocks below: carries the computation dtype, the precision of
    convolutions and matmuls (a jax.lax.Precision, or None for the default) and the
    network's options (norms, heads, padding) to every layer."""

    dtype: jnp.dtype = jnp.float32
    precision: jax.lax.Precision | None = None
    config: UNetConfig = UNetConfig()

    def conv(self, features: int, name: str, stride: int = 1, scale: float = 1.0) -> nn.Conv:
        return conv(features, name, self.dtype, self.precision, stride, scale)

    def dense(self, features: int, name: str, scale: float = 1.0) -> nn.Dense:
        return dense(features, name, self.dtype, self.precision, scale)

    def norm(self, name: str, groups: int = 0) -> nn.GroupNorm:
        cfg = self.config
        return group_norm(name, self.dtype, groups or cfg.norm_groups, cfg.norm_eps)

    def sub(self, cls, name: str, **fields):
        """A block of class `cls` with this one's dtype, precision and config."""
        return cls(self.dtype, self.precision, self.config, name=name, **fields)


class ResnetBlock(_Layers):
    """GroupNorm-swish-conv, + dense(swish(temb)), GroupNorm-swish-dropout-conv(zero init);
    with config.scale_shift the time embedding gives (s, b) and norm2(h)(1 + s) + b; with
    temb None (an autoencoder's block) no time term at all."""

    out_ch: int = 128
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, temb, train):
        h = self.conv(self.out_ch, "conv1")(nn.swish(self.norm("norm1")(x)))
        if temb is None:
            h = self.norm("norm2")(h)
        elif self.config.scale_shift:
            width = 2 * self.out_ch
            temb = self.dense(width, "temb_proj")(nn.swish(temb))[:, None, None, :]
            scale, shift = jnp.split(temb, 2, axis=-1)
            h = self.norm("norm2")(h) * (1 + scale) + shift
        else:
            temb = self.dense(self.out_ch, "temb_proj")(nn.swish(temb))[:, None, None, :]
            h = self.norm("norm2")(h + temb)
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.swish(h))
        h = self.conv(self.out_ch, "conv2", scale=0.0)(h)
        if x.shape[-1] != self.out_ch:
            x = self.dense(self.out_ch, "nin_shortcut")(x)  # 1x1 "network in network"
        return x + h


class AttnBlock(_Layers):
    """Self-attention over all positions (one head, or heads of config.attn_head_dim
    channels), residual, zero-initialised output; groups -1: no norm before it."""

    groups: int = 0

    @nn.compact
    def __call__(self, x):
        B, H, W, C = x.shape
        h = x if self.groups == -1 else self.norm("norm", self.groups)(x)
        q, k, v = (self.dense(C, name)(h).reshape(B, H * W, C) for name in ("q", "k", "v"))
        h = attend(q, k, v, self.config.attn_head_dim or C, self.precision)
        return x + self.dense(C, "proj_out", scale=0.0)(h.reshape(B, H, W, C))


def attend(q, k, v, head_dim: int, precision=None) -> jax.Array:
    """softmax(q k^T / √d) v for each head of d = head_dim channels; q, k, v (B, N, C). One
    head is computed as the paper's code does (so its checkpoints resume bit for bit)."""
    B, N, C = q.shape
    if head_dim == C:
        w = jnp.einsum("bic,bjc->bij", q, k, precision=precision) * (C**-0.5)
        w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(v.dtype)
        return jnp.einsum("bij,bjc->bic", w, v, precision=precision)
    q, k, v = (a.reshape(B, N, C // head_dim, head_dim) for a in (q, k, v))
    w = jnp.einsum("bihc,bjhc->bhij", q, k, precision=precision) * (head_dim**-0.5)
    w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhij,bjhc->bihc", w, v, precision=precision).reshape(B, N, C)


class Resample(_Layers):
    """Stride-2 conv (down) or nearest-neighbour ×2 + conv (up); without conv: avg-pool / ×2.
    The strided conv pads as config.downsample_pad says (TF's SAME is 0 before, 1 after)."""

    up: bool = False
    with_conv: bool = True

    @nn.compact
    def __call__(self, x):
        B, H, W, C = x.shape
        if self.up:
            x = jnp.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C))
            x = x.reshape(B, 2 * H, 2 * W, C)
            return self.conv(C, "conv")(x) if self.with_conv else x
        if not self.with_conv:
            return nn.avg_pool(x, (2, 2), (2, 2))
        if self.config.downsample_pad == "symmetric":
            x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
            return nn.Conv(
                C, (3, 3), (2, 2), "VALID", dtype=self.dtype, precision=self.precision,
                kernel_init=default_init(), name="conv",
            )(x)  # fmt: skip
        return self.conv(C, "conv", stride=2)(x)


class TimestepEmbed(_Layers):
    """temb = dense1(swish(dense0(sinusoidal(t)))), width 4·ch."""

    @nn.compact
    def __call__(self, t):
        cfg = self.config
        temb = timestep_embedding(t, cfg.ch, cfg.time_flip, cfg.time_shift).astype(self.dtype)
        temb = self.dense(4 * cfg.ch, "dense0")(temb)
        return self.dense(4 * cfg.ch, "dense1")(nn.swish(temb))


class DownLevel(_Layers):
    """One resolution on the way down: residual (+attention) blocks, then downsampling.

    Returns every intermediate activation, which the up path consumes as skip connections.
    """

    level: int = 0

    @nn.compact
    def __call__(self, h, temb, train):
        cfg, hs = self.config, []
        for i in range(cfg.num_res_blocks):
            out_ch = cfg.ch * cfg.ch_mult[self.level]
            block = self.sub(ResnetBlock, f"block_{i}", out_ch=out_ch, dropout=cfg.dropout)
            h = block(h, temb, train)
            if h.shape[1] in cfg.attn_resolutions:
                h = self.sub(AttnBlock, f"attn_{i}")(h)
            hs.append(h)
        if self.level != len(cfg.ch_mult) - 1:
            hs.append(self.sub(Resample, "downsample", with_conv=cfg.resamp_with_conv)(h))
        return hs


class UpLevel(_Layers):
    """One resolution on the way up: num_res_blocks + 1 blocks on concatenated skips, upsample."""

    level: int = 0

    @nn.compact
    def __call__(self, h, skips, temb, train):
        cfg = self.config
        for i in range(cfg.num_res_blocks + 1):
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            out_ch = cfg.ch * cfg.ch_mult[self.level]
            block = self.sub(ResnetBlock, f"block_{i}", out_ch=out_ch, dropout=cfg.dropout)
            h = block(h, temb, train)
            if h.shape[1] in cfg.attn_resolutions:
                h = self.sub(AttnBlock, f"attn_{i}")(h)
        if self.level != 0:
            h = self.sub(Resample, "upsample", up=True, with_conv=cfg.resamp_with_conv)(h)
        return h


class Middle(_Layers):
    """block_1 -> attn_1 -> block_2 at the lowest resolution (attn_1 unless `attention` is
    off, as an autoencoder may have it)."""

    attention: bool = True

    @nn.compact
    def __call__(self, h, temb, train):
        ch, dropout = h.shape[-1], self.config.dropout
        h = self.sub(ResnetBlock, "block_1", out_ch=ch, dropout=dropout)(h, temb, train)
        if self.attention:
            h = self.sub(AttnBlock, "attn_1", groups=self.config.mid_attn_groups)(h)
        return self.sub(ResnetBlock, "block_2", out_ch=ch, dropout=dropout)(h, temb, train)


class UNet(nn.Module):
    """ε_θ(x_t, t[, y]): NHWC images, int timesteps (B,) and, with num_classes > 0, int
    class labels y (B,) -> output of shape (B, H, W, out_ch).

    A class model adds a learned embedding of y to the timestep embedding; its row
    num_classes is "no label", used for y = None (or y == num_classes). `train=True`
    enables dropout and needs a 'dropout' rng. The output is float32 whatever the
    computation dtype.
    """

    config: UNetConfig = UNetConfig()

    @nn.compact
    def __call__(self, x, t, y=None, train=False):
        cfg = self.config
        dtype, precision = DTYPES[cfg.dtype], PRECISIONS[cfg.precision]
        if x.ndim != 4 or x.shape[1] != x.shape[2] or t.shape != x.shape[:1]:
            raise ValueError(
                f"expected square NHWC images and t of shape (B,); got x {x.shape}, t {t.shape}"
            )
        cfg.check_image_size(x.shape[1])
        temb = TimestepEmbed(dtype, precision, cfg, name="temb")(t)
        if cfg.num_classes:
            y = jnp.full(t.shape, cfg.num_classes, jnp.int32) if y is None else y
            embed = nn.Embed(cfg.num_classes + 1, temb.shape[-1], name="label_emb")
            temb = temb + embed(y).astype(dtype)
        elif y is not None:
            raise ValueError("labels given to an unconditional model (num_classes = 0)")
        hs = [conv(cfg.ch, "conv_in", dtype, precision)(x.astype(dtype))]
        for level in range(len(cfg.ch_mult)):
            down = DownLevel(dtype, precision, cfg, level, name=f"down_{level}")
            hs += down(hs[-1], temb, train)
        h = Middle(dtype, precision, cfg, name="mid")(hs[-1], temb, train)
        for level in reversed(range(len(cfg.ch_mult))):
            h = UpLevel(dtype, precision, cfg, level, name=f"up_{level}")(h, hs, temb, train)
        assert not hs, "every skip connection must be consumed"
        h = nn.swish(group_norm("norm_out", dtype, cfg.norm_groups, cfg.norm_eps)(h))
        h = conv(cfg.out_ch, "conv_out", dtype, precision, scale=0.0)(h)
        return h.astype(jnp.float32)


def apply_in_chunks(fn, chunk_size: int, *batched: jax.Array) -> jax.Array:
    """fn(*batched) computed as lax.map over chunks of `chunk_size` examples.

    Same numbers, same single compilation; on CPUs a chunk that fits in cache makes the
    convolutions markedly faster than one large batch (see bench/unet_bench.py).
    """
    batch = batched[0].shape[0]
    if chunk_size >= batch:
        return fn(*batched)
    if batch % chunk_size:
        raise ValueError(f"batch size {batch} is not divisible by chunk_size {chunk_size}")
    split = lambda a: a.reshape(batch // chunk_size, chunk_size, *a.shape[1:])
    out = jax.lax.map(lambda args: fn(*args), tuple(split(a) for a in batched))
    return jax.tree.map(lambda a: a.reshape(batch, *a.shape[2:]), out)
