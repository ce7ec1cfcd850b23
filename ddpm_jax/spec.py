"""The typed diffusion spec: what the network output means and how it is trained.

One frozen `DiffusionSpec` (mean, variance and loss types, x̂_0 clipping, the hybrid
loss's λ) is built and checked once from a config (config_lib.diffusion_spec) and passed
to every function of diffusion, sampling, evaluation and training, instead of loose
strings. Its enums are `StrEnum`s: they compare equal to the strings configs use.
"""

import dataclasses
import enum

import jax.numpy as jnp

from ddpm_jax.errors import UserError


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


MEAN_TYPES, VAR_TYPES, LOSS_TYPES = (tuple(e) for e in (MeanType, VarType, LossType))


def check_choice(name, value, choices):
    """Raise a UserError naming `name` unless `value` is one of `choices`."""
    if value not in choices:
        raise UserError(f"unknown {name} {value!r}; choose one of {tuple(map(str, choices))}")


def _as(enum_type, name, value):
    if value not in tuple(enum_type):
        choices = ", ".join(map(repr, map(str, enum_type)))
        raise UserError(f"{name}: unknown value {value!r}; choose one of {choices}")
    return enum_type(value)


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
        for name, enum_type in (("mean_type", MeanType), ("var_type", VarType)):
            object.__setattr__(self, name, _as(enum_type, name, getattr(self, name)))
        object.__setattr__(self, "loss_type", _as(LossType, "loss_type", self.loss_type))
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
    def learned_variance(self):
        return self.var_type == VarType.LEARNED_RANGE

    def output_channels(self, num_channels):
        """Channels of the network output: the mean part, and as many again for Σ_θ."""
        return 2 * num_channels if self.learned_variance else num_channels


def split_output(spec: DiffusionSpec, model_output):
    """(mean part, variance part or None) of the network output (channels last)."""
    if not spec.learned_variance:
        return model_output, None
    return jnp.split(model_output, 2, axis=-1)
