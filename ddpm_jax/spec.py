"""The typed setup: what the core of the library takes instead of a config.

`config_lib.build(config)` checks a config once and returns one frozen `Setup`: the
U-Net's config, the `Schedule`, the `DiffusionSpec` (what the network output means and how
it is trained), the `SamplerSpec` (which reverse process, how many steps), the `TrainSpec`
(the optimizer, EMA, label dropout, timestep sampler) and the image shape. Every function
of diffusion, sampling, evaluation and training takes these, never the config. The enums
are `StrEnum`s: they compare equal to the strings configs use.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import TYPE_CHECKING, TypeVar

import jax
import jax.numpy as jnp

from ddpm_jax.errors import UserError
from ddpm_jax.schedules import Schedule

if TYPE_CHECKING:  # unet imports Flax; the spec itself does not need it
    from ddpm_jax.autoencoder import AutoencoderConfig
    from ddpm_jax.unet import UNet, UNetConfig


class Stage(enum.StrEnum):
    """What a config trains (config.stage): a diffusion model, or the first stage of a
    latent one (autoencoder_training.py)."""

    DIFFUSION = "diffusion"
    AUTOENCODER = "autoencoder"


class MeanType(enum.StrEnum):
    """What the network predicts (§3.2; v from Salimans & Ho 2022)."""

    EPS = "eps"  # ε, the paper's choice (eq. 11)
    X0 = "x0"
    XPREV = "xprev"  # μ̃_t itself
    V = "v"  # v = √ᾱ_t ε - √(1-ᾱ_t) x_0


class VarType(enum.StrEnum):
    """Σ_θ(x_t, t): fixed (§3.2) or learned (Nichol & Dhariwal 2021, eq. 15)."""

    FIXED_SMALL = "fixedsmall"  # σ²_t = β̃_t
    FIXED_LARGE = "fixedlarge"  # σ²_t = β_t
    LEARNED_RANGE = "learned_range"  # log Σ = v log β_t + (1-v) log β̃_t, v from the network


class LossType(enum.StrEnum):
    MSE = "mse"  # L_simple (eq. 14) on the mean type's target
    L1 = "l1"  # mean absolute error on the same target
    KL = "kl"  # the true bound term L_{t-1} (eq. 5)
    HYBRID = "hybrid"  # L_simple + λ L_vlb, the mean frozen in L_vlb (Nichol & Dhariwal eq. 16)


class SamplerMethod(enum.StrEnum):
    """The reverse process of sampling."""

    ANCESTRAL = "ancestral"  # Algorithm 2: x_{t-1} ~ p_θ(x_{t-1} | x_t)
    DDIM = "ddim"  # Song et al. 2021 (eq. 12), with η (0: deterministic)
    DPMPP_2M = "dpm++2m"  # DPM-Solver++(2M), Lu et al. 2022b (solvers.py)
    DPMPP_3M = "dpm++3m"  # DPM-Solver++(3M)
    SDE_DPMPP_2M = "sde-dpm++2m"  # SDE-DPM-Solver++(2M): noise at every step
    UNIPC_2 = "unipc2"  # UniPC-2 with B(h) = e^{-h} - 1 (bh2), Zhao et al. 2023
    UNIPC_3 = "unipc3"  # UniPC-3, bh2

    @property
    def multistep(self) -> bool:
        """A solver of solvers.py: the whole chain in one program, history in the carry."""
        return self not in (SamplerMethod.ANCESTRAL, SamplerMethod.DDIM)


class Spacing(enum.StrEnum):
    """Where a solver's N steps lie among the T training steps (diffusers' names)."""

    LINSPACE = "linspace"  # round(linspace(0, T-1, N+1)) reversed, the last dropped
    LEADING = "leading"  # (T // N) k for k = N-1 .. 0
    TRAILING = "trailing"  # round(T - k T/N) - 1 for k = 0 .. N-1


class TimestepSampler(enum.StrEnum):
    """How training draws t (timesteps.py)."""

    UNIFORM = "uniform"  # Algorithm 1, line 3
    IMPORTANCE = "importance"  # Nichol & Dhariwal 2021, §3.3


MEAN_TYPES, VAR_TYPES, LOSS_TYPES = (tuple(e) for e in (MeanType, VarType, LossType))


E = TypeVar("E", bound=enum.StrEnum)


def choose(enum_type: type[E], name: str, value: object) -> E:
    """`value` as a member of `enum_type`, or a UserError naming the setting `name` and
    the choices."""
    if value not in tuple(enum_type):
        choices = ", ".join(map(repr, map(str, enum_type)))
        raise UserError(f"{name}: unknown value {value!r}; choose one of {choices}")
    return enum_type(value)


def _set_enums(obj, **enum_types):
    for name, enum_type in enum_types.items():
        object.__setattr__(obj, name, choose(enum_type, name, getattr(obj, name)))


@dataclasses.dataclass(frozen=True)
class DiffusionSpec:
    """What the network output means and how it is trained and decoded; built and checked
    once (config_lib.diffusion_spec), then passed to every function here."""

    mean_type: MeanType = MeanType.EPS
    var_type: VarType = VarType.FIXED_LARGE
    loss_type: LossType = LossType.MSE
    clip_x0: bool = True  # clip x̂_0 to [-1, 1] when decoding (sampling, the bound)
    hybrid_lambda: float = 0.001  # λ of the hybrid loss

    def __post_init__(self):
        _set_enums(self, mean_type=MeanType, var_type=VarType, loss_type=LossType)
        learned, loss = self.learned_variance, self.loss_type
        if learned and loss not in (LossType.KL, LossType.HYBRID):
            raise UserError(
                f"var_type='learned_range' is trained only by the bound, which loss_type="
                f"'{loss}' lacks: use loss_type='hybrid' (Nichol & Dhariwal) or 'kl'"
            )
        if loss == LossType.HYBRID and not learned:
            raise UserError(
                "loss_type='hybrid' trains Σ_θ through its bound term and with a fixed "
                f"var_type='{self.var_type}' equals 'mse': set var_type='learned_range'"
            )
        if not self.hybrid_lambda > 0:
            raise UserError(f"hybrid_lambda must be > 0, got {self.hybrid_lambda}")

    @property
    def learned_variance(self) -> bool:
        return self.var_type == VarType.LEARNED_RANGE

    def output_channels(self, num_channels: int) -> int:
        """Channels of the network output: the mean part, and as many again for Σ_θ."""
        return 2 * num_channels if self.learned_variance else num_channels


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """How samples are drawn: the method, the chain's length and the defaults of sample_fn."""

    method: SamplerMethod = SamplerMethod.ANCESTRAL
    num_steps: int = 1000  # reverse steps; fewer than T respace the chain (Nichol & Dhariwal §4)
    eta: float = 0.0  # DDIM's η; the ancestral method has none
    batch_size: int = 64  # the most samples drawn at once
    guidance: float = 0.0  # the classifier-free guidance weight w of a class model
    spacing: Spacing = Spacing.LINSPACE  # a multistep solver's timesteps

    def __post_init__(self):
        _set_enums(self, method=SamplerMethod, spacing=Spacing)


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """The optimizer, the EMA and what a train step draws (Algorithm 1)."""

    batch_size: int = 128  # global
    learning_rate: float = 2e-4  # Adam's, reached after warmup_steps (linear from 0)
    warmup_steps: int = 5000
    grad_clip: float = 1.0  # on the global gradient norm
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay min(ema_decay, (1 + n) / (10 + n)) at update n
    label_dropout: float = 0.0  # a class model's labels replaced by ∅ with this probability
    timestep_sampler: TimestepSampler = TimestepSampler.UNIFORM

    def __post_init__(self):
        _set_enums(self, timestep_sampler=TimestepSampler)


@dataclasses.dataclass(frozen=True)
class LatentSpec:
    """The frozen first stage of a latent diffusion model (Rombach et al. 2022): the
    diffusion runs on z · scale, z ~ q(z | x) of this autoencoder (first_stage.py)."""

    autoencoder: AutoencoderConfig
    pixel_shape: tuple[int, int, int]  # (H, W, C) of the data the autoencoder encodes
    source: str  # the first stage's training workdir, or a diffusers AutoencoderKL folder
    scale: float  # the latents' factor; 0: 1/std of the first training batch's latents
    step: int = 0  # a workdir's checkpoint to use; 0: its newest good one

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.autoencoder.latent_shape(self.pixel_shape)


@dataclasses.dataclass(frozen=True, eq=False)
class Setup:
    """Everything the core takes of a config, checked and built once (config_lib.build)."""

    unet: UNetConfig
    schedule: Schedule
    diffusion: DiffusionSpec
    sampler: SamplerSpec
    training: TrainSpec
    image_shape: tuple[int, int, int]  # (H, W, C) of what the diffusion runs on, in [-1, 1]
    seed: int = 0  # of the parameters' initialisation and of training's randomness
    latent: LatentSpec | None = None  # a latent model's first stage; None: pixel space

    @property
    def data_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the data and of the samples: the pixels a latent model decodes to."""
        return self.image_shape if self.latent is None else self.latent.pixel_shape

    @property
    def num_classes(self) -> int:
        """K of a class model (labels 0..K-1, K meaning ∅), 0 for an unconditional one."""
        return self.unet.num_classes

    @functools.cached_property
    def model(self) -> UNet:
        """The U-Net (a Flax module: only its config, no parameters)."""
        from ddpm_jax import unet

        return unet.UNet(self.unet)

    @property
    def respaced(self) -> bool:
        """Whether sampling runs a shorter chain than the T steps of training."""
        return self.sampler.num_steps != self.schedule.num_timesteps


def split_output(
    spec: DiffusionSpec, model_output: jax.Array
) -> tuple[jax.Array, jax.Array | None]:
    """(mean part, variance part or None) of the network output (channels last)."""
    if not spec.learned_variance:
        return model_output, None
    return jnp.split(model_output, 2, axis=-1)
