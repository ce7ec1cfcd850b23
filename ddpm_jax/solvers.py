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

UniPC (Zhao et al. 2023, the B(h) = e^{-h} - 1 variant "bh2", on data predictions) adds a
corrector: after the network call at x_i (the predictor's output), x_i is corrected from
x_{i-1} with m_i and the earlier m (UniC), and the next predictor (UniP) starts from the
corrected x_i, so it costs no extra call. With p the order and r_k = (λ_{i-k} - λ_i)/h_i,
UniP is x_{i+1} = (σ_{i+1}/σ_i) x_i - α_{i+1} φ m_i - α_{i+1} B Σ_k ρ_k (m_{i-k} - m_i)/r_k
(φ = e^{-h} - 1 = B; ρ = ½ at order 2, else the solution of Σ_k ρ_k r_k^{j-1} = b_j,
j < p, with b_j = j! g_j / B, g_1 = φ/(-h) - 1, g_{j+1} = g_j/(-h) - 1/(j+1)!); UniC is the
same step from x_{i-1} with one more term, ρ_p (m_i - m_{i-1}), and ρ from all p equations
(½ at order 1). Every step is then linear too: x_i ← u x_i + v x_{i-1} + Σ_k w_k m_{i-k}.

Orders follow diffusers' multistep schedulers (their defaults `lower_order_final=True`,
`final_sigmas_type="zero"`): step i has order min(i + 1, order), the last step (to σ = 0)
first order; DPM-Solver++ with fewer than 15 steps takes the one before it at most second
order, UniPC min(order, N - i) at step i. UniC at step i has the order of UniP at step i-1.
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
    SamplerMethod.DDIM: 1,  # DPM-Solver++ of order 1 is DDIM with η = 0
    SamplerMethod.DPMPP_2M: 2,
    SamplerMethod.DPMPP_3M: 3,
    SamplerMethod.SDE_DPMPP_2M: 2,
    SamplerMethod.UNIPC_2: 2,
    SamplerMethod.UNIPC_3: 3,
}
UNIPC = (SamplerMethod.UNIPC_2, SamplerMethod.UNIPC_3)


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


def step_orders(num_steps: int, order: int, solver=SamplerMethod.DPMPP_2M) -> list[int]:
    """The order of each step (see the module docstring)."""
    if SamplerMethod(solver) in UNIPC:
        return [min(order, num_steps - i, i + 1) for i in range(num_steps)]
    orders = [min(i + 1, order) for i in range(num_steps)]
    orders[-1] = 1
    if num_steps < 15 and num_steps >= 2:
        orders[-2] = min(orders[-2], 2)
    return orders


def coefficients(alphas_cumprod, timesteps, solver: SamplerMethod) -> dict[str, np.ndarray]:
    """In float64: a (N,), c (N, K) and s (N,) of x_{i+1} = a x_i + Σ_k c_k m_{i-k} + s z_i,
    and for UniPC u, v (N,) and w (N, K) of its corrector x_i ← u x_i + v x_{i-1} +
    Σ_k w_k m_{i-k}; K = the order (UniPC: the order + 1)."""
    ab = np.asarray(alphas_cumprod, np.float64)[np.asarray(timesteps)]
    alpha = np.append(np.sqrt(ab), 1.0)  # σ = 0 after the last step
    sigma = np.append(np.sqrt(1.0 - ab), 0.0)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # λ_N = +inf
    n, unipc = len(ab), solver in UNIPC
    orders = step_orders(n, ORDER[solver], solver)
    width = ORDER[solver] + unipc
    a, c, s = np.zeros(n), np.zeros((n, width)), np.zeros(n)
    u, v, w = np.ones(n), np.zeros(n), np.zeros((n, width))  # no correction at step 0
    for i, order in enumerate(orders):
        h = lam[i + 1] - lam[i]
        r = [(lam[i - k] - lam[i - k - 1]) / h for k in range(order - 1)]  # r_0, r_1
        if unipc:
            a[i], c[i, :order] = sigma[i + 1] / sigma[i], _unipc(lam, alpha, i, order)
        else:
            a[i], cs, s[i] = _step(solver, order, h, r, alpha[i + 1], sigma[i + 1] / sigma[i])
            c[i] = cs[:width]  # 2M: the third is 0
        s[i] *= sigma[i + 1]
        if unipc and i > 0:  # UniC of x_i from x_{i-1}, on m_i, m_{i-1}, ...
            u[i], v[i] = 0.0, sigma[i] / sigma[i - 1]
            w[i, : orders[i - 1] + 1] = _unipc(lam, alpha, i - 1, orders[i - 1], corrector=True)
    k = dict(a=a, c=c, s=s)
    return k | dict(u=u, v=v, w=w) if unipc else k


def _unipc(lam, alpha, i, order, corrector=False):
    """UniP's coefficients on m_i, ..., m_{i-order+1} for the step from i to i + 1, or
    UniC's on m_{i+1}, m_i, ..., m_{i-order+1} (module docstring)."""
    h = lam[i + 1] - lam[i]
    phi = math.expm1(-h)  # e^{-h} - 1, which is also B(h) of bh2
    r = np.array([(lam[i - k] - lam[i]) / h for k in range(1, order)])
    if corrector:  # ρ_1..ρ_{p-1} on the D1_k, ρ_p on m_{i+1} - m_i: all p equations
        rho = [0.5] if order == 1 else _solve_vander(np.append(r, 1.0), _unipc_b(h, order))
    else:  # p - 1 equations for the D1_k
        rho = [0.5] if order == 2 else _solve_vander(r, _unipc_b(h, order - 1))
    rho = np.asarray(rho, np.float64)
    alpha, on_d1 = alpha[i + 1], rho[: order - 1] / r  # ρ_k D1_k = ρ_k (m_{i-k} - m_i)/r_k
    out = [-alpha * phi + alpha * phi * on_d1.sum(), *(-alpha * phi * on_d1)]
    if corrector:  # ρ_p (m_{i+1} - m_i)
        out = [-alpha * phi * rho[-1], out[0] + alpha * phi * rho[-1], *out[1:]]
    return out


def _solve_vander(r, b):
    """ρ with Σ_k ρ_k r_k^{j-1} = b_j for j = 1..len(b)."""
    return np.linalg.solve(np.vander(r, increasing=True).T, b) if len(b) else np.zeros(0)


def _unipc_b(h, order):
    """b_j = j! g_j / B(h), g_1 = φ/(-h) - 1, g_{j+1} = g_j/(-h) - 1/(j+1)!, j = 1..order."""
    phi, g, b = math.expm1(-h), math.expm1(-h) / -h - 1, []
    for j in range(1, order + 1):
        b.append(g * math.factorial(j) / phi)
        g = g / -h - 1 / math.factorial(j + 1)
    return np.array(b)


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
    solver=SamplerMethod.DPMPP_2M, noise=None, trajectory: bool = False, project=None,
) -> jax.Array:  # fmt: skip
    """x_0 from x_T (taken as x at timesteps[0]) by `solver`, one network call per step, as
    one `lax.scan`. model_fn(x_t, t) -> network output. The SDE solver's z_i is
    diffusion.step_noise(noise, i, x) for step i (noise: one key per sample, a function, or
    an array with one draw per step on axis 0). trajectory: x after every step, stacked.
    project(x, i), if given, replaces x after step i (editing.py keeps a mask's region)."""
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
    xs = (jnp.asarray(timesteps), jnp.arange(len(timesteps))) + tuple(
        jnp.asarray(k[name], x_T.dtype) for name in ("a", "c", "s", "u", "v", "w") if name in k
    )

    def step(carry, inputs):
        x, x_last, history = carry  # x_i, the corrected x_{i-1} (UniPC), m_{i-1}, m_{i-2}, ...
        t, i, a, c, s, *uvw = inputs
        t_b = jnp.full((x.shape[0],), t, jnp.int32)
        ms = (diffusion.p_mean_variance(sched, spec, model_fn(x, t_b), x, t_b)["x0_pred"],)
        ms += history
        if uvw:  # UniC: x_i corrected with m_i, before UniP starts from it
            u, v, w = uvw
            x = x_last = u * x + v * x_last + sum(w[k] * m for k, m in enumerate(ms))
        x = a * x + sum(c[k] * m for k, m in enumerate(ms[: c.shape[0]]))
        if stochastic:
            x = x + s * diffusion.step_noise(noise, i, x)
        if project is not None:
            x = project(x, i)
        return (x, x_last, ms[:-1]), (x if trajectory else None)

    history = (jnp.zeros_like(x_T),) * (k["w" if "w" in k else "c"].shape[1] - 1)
    carry = (x_T, x_T if solver in UNIPC else None, history)
    (x_0, _, _), xs_out = jax.lax.scan(step, carry, xs)
    return xs_out if trajectory else x_0
