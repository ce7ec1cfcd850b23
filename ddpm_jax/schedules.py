"""Noise schedules β_1..β_T and the tables derived from them (Ho et al. 2020, §2 and §4).

All tables are computed once in float64 NumPy and then cast to JAX's default float
dtype (float32, or float64 under `jax_enable_x64`). Index `t` is 0-based: `t` in
{0, ..., T-1} is the paper's step t+1.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "quad", "scaled_linear", "const", "jsd", "warmup10", "warmup50", "cosine")


def _warmup_betas(beta_start, beta_end, num_timesteps, warmup_frac):
    """β_end everywhere, with a linear ramp from β_start over the first `warmup_frac` of steps."""
    betas = beta_end * np.ones(num_timesteps, dtype=np.float64)
    warmup_time = int(num_timesteps * warmup_frac)
    betas[:warmup_time] = np.linspace(beta_start, beta_end, warmup_time, dtype=np.float64)
    return betas


def _cosine_betas(num_timesteps, s=0.008, max_beta=0.999):
    """Nichol & Dhariwal (2021) eq. 17: ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), β_t ≤ 0.999."""
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    alpha_bar = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def get_beta_schedule(
    name: str, *, beta_start: float = 1e-4, beta_end: float = 0.02, num_timesteps: int = 1000
) -> np.ndarray:
    """β_1..β_T as float64 NumPy; the paper uses 'linear' from 1e-4 to 0.02 with T=1000 (§4)."""
    if not isinstance(num_timesteps, int | np.integer) or num_timesteps < 1:
        raise ValueError(f"num_timesteps (T) must be an integer >= 1, got {num_timesteps!r}")
    T = int(num_timesteps)
    if name in ("linear", "quad", "scaled_linear", "warmup10", "warmup50") and not (
        beta_start <= beta_end
    ):
        raise ValueError(
            f"beta_start ({beta_start}) must be <= beta_end ({beta_end}): β grows with t"
        )
    if name == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif name in ("quad", "scaled_linear"):  # LDM / Stable Diffusion call it scaled_linear
        betas = np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    elif name == "const":
        betas = beta_end * np.ones(T, dtype=np.float64)
    elif name == "jsd":  # 1/T, 1/(T-1), ..., 1
        betas = 1.0 / np.linspace(T, 1, T, dtype=np.float64)
    elif name in ("warmup10", "warmup50"):
        betas = _warmup_betas(beta_start, beta_end, T, int(name[len("warmup") :]) / 100)
    elif name == "cosine":
        betas = _cosine_betas(T)
    else:
        raise ValueError(f"unknown beta schedule {name!r}; choose one of {SCHEDULES}")
    check_betas(betas)
    return betas


def check_betas(betas: np.ndarray) -> None:
    """Raise ValueError unless betas is a non-empty 1-D array with every β_t in (0, 1]."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 1:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not np.all((betas > 0) & (betas <= 1)):
        bad = betas[~((betas > 0) & (betas <= 1))]
        raise ValueError(f"betas must lie in (0, 1]; got values such as {bad[:3].tolist()}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
    """The per-step tables of the forward process and its posterior, as device arrays.

    Names follow the paper: α_t = 1 - β_t, ᾱ_t = Π_{s≤t} α_s (eq. 4), β̃_t = (1 - ᾱ_{t-1}) /
    (1 - ᾱ_t) · β_t and the posterior mean coefficients of eq. 7.
    """

    betas: jax.Array
    alphas_cumprod: jax.Array  # ᾱ_t
    alphas_cumprod_prev: jax.Array  # ᾱ_{t-1}, with ᾱ_0 = 1
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array  # 1/√ᾱ_t
    sqrt_recipm1_alphas_cumprod: jax.Array  # √(1/ᾱ_t - 1)
    posterior_variance: jax.Array  # β̃_t (eq. 7)
    posterior_log_variance_clipped: jax.Array  # log β̃_t, with β̃_1 := β̃_2 (β̃_1 = 0)
    posterior_mean_coef1: jax.Array  # multiplies x_0 in μ̃_t (eq. 7)
    posterior_mean_coef2: jax.Array  # multiplies x_t in μ̃_t (eq. 7)
    # log σ²_t for σ²_t = β_t ("fixed large", §3.2), with log β̃ at the first step as the
    # authors' code does so that the decoder at t=0 has a finite variance.
    large_log_variance: jax.Array

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def schedule_tables(betas: np.ndarray) -> dict[str, np.ndarray]:
    """Float64 NumPy tables of eq. 4 and eq. 6-7 for the given β_1..β_T."""
    check_betas(betas)
    betas = np.asarray(betas, dtype=np.float64)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    # β̃ at t=0 is 0; clip its log to the first nonzero entry (needs T >= 2 to exist).
    first_nonzero = posterior_variance[1] if betas.size > 1 else betas[0]
    with np.errstate(divide="ignore"):
        return dict(
            betas=betas,
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=np.sqrt(ac),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
            log_one_minus_alphas_cumprod=np.log(1.0 - ac),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=np.log(np.append(first_nonzero, posterior_variance[1:])),
            posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            large_log_variance=np.log(np.append(first_nonzero, betas[1:])),
        )


def make_schedule(
    name: str = "linear", *, beta_start: float = 1e-4, beta_end: float = 0.02,
    num_timesteps: int = 1000,
) -> "Schedule":  # fmt: skip
    """The Schedule pytree for a named β schedule (eq. 4), cast once to JAX's default float."""
    betas = get_beta_schedule(
        name, beta_start=beta_start, beta_end=beta_end, num_timesteps=num_timesteps
    )
    return schedule_from_betas(betas)


def schedule_from_betas(betas: np.ndarray) -> "Schedule":
    """The Schedule pytree for explicit β_1..β_T (e.g. a respaced subset of a schedule)."""
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
    tables = schedule_tables(betas)
    return Schedule(**{k: jnp.asarray(v.astype(dtype)) for k, v in tables.items()})


def space_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """`num_steps` of the 0-based steps 0..T-1, evenly spaced, always keeping 0 and T-1."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, T={num_timesteps}], got {num_steps}")
    return np.unique(np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int64))


def respace_betas(betas: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """β of the shorter chain that visits only `timesteps` (increasing, 0-based) of the
    chain of `betas`, so that its ᾱ are the original ᾱ at those steps:
    β'_i = 1 - ᾱ_{s_i} / ᾱ_{s_{i-1}} (Nichol & Dhariwal 2021, §4)."""
    timesteps = np.asarray(timesteps)
    if timesteps.ndim != 1 or timesteps.size < 1 or np.any(np.diff(timesteps) <= 0):
        raise ValueError(f"timesteps must be strictly increasing, got {timesteps}")
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))[timesteps]
    return 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
