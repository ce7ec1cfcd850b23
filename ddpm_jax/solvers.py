"""Multistep solvers of the diffusion ODE/SDE in 10-25 network calls: DPM-Solver++ (Lu et
al. 2022b) 2M and 3M, and SDE-DPM-Solver++ 2M, over any decreasing sequence of training
timestep indices t_0 > t_1 > ... > t_{N-1}, ending at σ = 0 (x_0).

With α_i = √ᾱ_{t_i}, σ_i = √(1-ᾱ_{t_i}), λ_i = log(α_i/σ_i), h_i = λ_{i+1} - λ_i and the data
prediction m_i = x̂_0(x_i, t_i) (from ε, x_0 or v; clipped as the DiffusionSpec says; the
mean part of a learned-range model), every step is linear in x_i and the last three m:

    x_{i+1} = a_i x_i + c_i0 m_i + c_i1 m_{i-1} + c_i2 m_{i-2} + s_i z_i

First order (DDIM): a = σ_{i+1}/σ_i, c_0 = -α_{i+1}(e^{-h}-1). Second order (2M, the
paper's Algorithm 2 with the "midpoint" form of D_1): D_1 = (m_i - m_{i-1})/r_0,
r_0 = h_{i-1}/h_i, adding -½ α_{i+1}(e^{-h}-1) D_1. Third order adds the D_1, D_2 terms of the
paper's eq. for 3M. SDE-DPM-Solver++: a = (σ_{i+1}/σ_i) e^{-h}, c_0 = α_{i+1}(1-e^{-2h}) (plus
½ of it times D_1 at second order) and s = σ_{i+1} √(1-e^{-2h}). The coefficients depend only
on the timesteps, so they are computed once on the host in float64; the steps run as one
`lax.scan` with (x, m_{i-1}, m_{i-2}) in the carry.

Orders follow diffusers' multistep schedulers (their defaults `lower_order_final=True`,
`final_sigmas_type="zero"`): step i has order min(i + 1, order), the last step (to σ = 0)
first order, and with fewer than 15 steps the one before it at most second order.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion
from ddpm_jax.guidance import ModelFn
from ddpm_jax.schedules import Schedule
from ddpm_jax.spec import DiffusionSpec, SamplerMethod, Spacing

ORDER = {
    SamplerMethod.DPMPP_2M: 2,
    SamplerMethod.DPMPP_3M: 3,
    SamplerMethod.SDE_DPMPP_2M: 2,
}


def spaced_timesteps(num_timesteps: int, num_steps: int, spacing=Spacing.LINSPACE) -> np.ndarray:
    """N decreasing training step indices (0-based) for a solver (spec.Spacing)."""
    T, N, spacing = num_timesteps, num_steps, Spacing(spacing)
    if not 1 <= N <= T:
        raise ValueError(f"num_steps must be in 1..{T}, got {N}")
    if spacing == Spacing.LINSPACE:
        ts = np.linspace(0, T - 1, N + 1).round()[::-1][:-1]
    elif spacing == Spacing.LEADING:
        ts = (np.arange(N) * (T // N)).round()[::-1]
    else:
        ts = np.round(np.arange(T, 0, -T / N)) - 1
    return ts.astype(np.int32)


def step_orders(num_steps: int, order: int) -> list[int]:
    """The order of each step (see the module docstring)."""
    orders = [min(i + 1, order) for i in range(num_steps)]
    orders[-1] = 1
    if num_steps < 15 and num_steps >= 2:
        orders[-2] = min(orders[-2], 2)
    return orders


def coefficients(alphas_cumprod, timesteps, solver: SamplerMethod) -> dict[str, np.ndarray]:
    """a (N,), c (N, 3) and s (N,) of x_{i+1} = a x_i + Σ_k c_k m_{i-k} + s z_i, in float64."""
    ab = np.asarray(alphas_cumprod, np.float64)[np.asarray(timesteps)]
    alpha = np.append(np.sqrt(ab), 1.0)  # σ = 0 after the last step
    sigma = np.append(np.sqrt(1.0 - ab), 0.0)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # λ_N = +inf
    n = len(ab)
    a, c, s = np.zeros(n), np.zeros((n, 3)), np.zeros(n)
    for i, order in enumerate(step_orders(n, ORDER[solver])):
        h = lam[i + 1] - lam[i]
        r = [(lam[i - k] - lam[i - k - 1]) / h for k in range(order - 1)]  # r_0, r_1
        a[i], c[i], s[i] = _step(solver, order, h, r, alpha[i + 1], sigma[i + 1] / sigma[i])
        s[i] *= sigma[i + 1]
    return dict(a=a, c=c, s=s)


def _step(solver, order, h, r, alpha, ratio):
    """(a, c, s / σ_{i+1}) of one step of `order` with h = h_i and r = [r_0, r_1][:order-1]."""
    if solver == SamplerMethod.SDE_DPMPP_2M:
        decay = math.exp(-h)  # e^{-h}, 0 at the last step
        gain = alpha * -math.expm1(-2 * h)  # α(1 - e^{-2h})
        c = [gain, 0.0, 0.0]
        if order == 2:
            c = [gain * (1 + 0.5 / r[0]), -gain * 0.5 / r[0], 0.0]
        return ratio * decay, c, math.sqrt(-math.expm1(-2 * h))
    phi = math.expm1(-h)  # e^{-h} - 1
    c = [-alpha * phi, 0.0, 0.0]
    if order == 2:
        c = [-alpha * phi * (1 + 0.5 / r[0]), alpha * phi * 0.5 / r[0], 0.0]
    elif order == 3:
        c = _third_order(alpha, phi, h, *r)
    return ratio, c, 0.0


def _third_order(alpha, phi, h, r0, r1):
    """DPM-Solver++(3M): -αφ D_0 + α(φ/h + 1) D_1 - α((φ + h)/h² - ½) D_2 with
    D_1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1), D_2 = (D1_0 - D1_1)/(r0+r1),
    D1_0 = (m_0 - m_1)/r0, D1_1 = (m_1 - m_2)/r1, written on m_0, m_1, m_2."""
    A, B = alpha * (phi / h + 1), alpha * ((phi + h) / h**2 - 0.5)
    on_d10 = A * (1 + r0 / (r0 + r1)) - B / (r0 + r1)
    on_d11 = -A * r0 / (r0 + r1) + B / (r0 + r1)
    return [-alpha * phi + on_d10 / r0, -on_d10 / r0 + on_d11 / r1, -on_d11 / r1]


def solve(
    sched: Schedule, spec: DiffusionSpec, model_fn: ModelFn, x_T: jax.Array, timesteps,
    solver=SamplerMethod.DPMPP_2M, noise=None, trajectory: bool = False,
) -> jax.Array:  # fmt: skip
    """x_0 from x_T (taken as x at timesteps[0]) by `solver`, one network call per step, as
    one `lax.scan`. model_fn(x_t, t) -> network output. The SDE solver's z_i is
    diffusion.step_noise(noise, i, x) for step i (noise: one key per sample, a function, or
    an array with one draw per step on axis 0). trajectory: x after every step, stacked."""
    solver, timesteps = SamplerMethod(solver), np.asarray(timesteps, np.int32)
    stochastic = solver == SamplerMethod.SDE_DPMPP_2M
    if solver not in ORDER:
        raise ValueError(
            f"{solver.value} is not a multistep solver: one of {list(map(str, ORDER))}"
        )
    if timesteps.ndim != 1 or np.any(np.diff(timesteps) >= 0):
        raise ValueError(f"timesteps must be strictly decreasing, got {timesteps}")
    if stochastic and noise is None:
        raise ValueError(f"{solver.value} draws noise at every step: give `noise`")
    k = coefficients(np.asarray(sched.alphas_cumprod), timesteps, solver)
    dtype = x_T.dtype
    xs = (
        jnp.asarray(timesteps), jnp.arange(len(timesteps)),
        jnp.asarray(k["a"], dtype), jnp.asarray(k["c"], dtype), jnp.asarray(k["s"], dtype),
    )  # fmt: skip

    def step(carry, inputs):
        x, m1, m2 = carry
        t, i, a, c, s = inputs
        t_b = jnp.full((x.shape[0],), t, jnp.int32)
        m = diffusion.p_mean_variance(sched, spec, model_fn(x, t_b), x, t_b)["x0_pred"]
        x = a * x + c[0] * m + c[1] * m1 + c[2] * m2
        if stochastic:
            x = x + s * diffusion.step_noise(noise, i, x)
        return (x, m, m1), (x if trajectory else None)

    zeros = jnp.zeros_like(x_T)
    (x_0, _, _), xs_out = jax.lax.scan(step, (x_T, zeros, zeros), xs)
    return xs_out if trajectory else x_0
