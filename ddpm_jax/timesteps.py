"""How training draws its timesteps: uniformly (Algorithm 1, line 3), or by importance.

Importance sampling of the bound (Nichol & Dhariwal 2021, §3.3): p_t ∝ √E[L_t²], the
expectation taken over the last HISTORY losses seen at each t, uniform until every t has
that many; each example's loss is weighted by 1/(T p_t), so that the weighted mean is an
unbiased estimate of the uniform one (and T times it of the bound Σ_t L_t). A small
uniform share keeps every p_t > 0. The history is part of the train state: it is
checkpointed (resume stays exact) and replicated like the rest of it.
"""

import flax
import jax
import jax.numpy as jnp

HISTORY = 10  # losses kept per t
UNIFORM_SHARE = 1e-3  # of the probability mass, spread evenly over t


@flax.struct.dataclass
class LossHistory:
    losses: jax.Array  # (T, HISTORY) float32: the last losses at t, oldest first
    counts: jax.Array  # (T,) int32: how many of them are filled (at most HISTORY)


def init_history(num_timesteps: int, size: int = HISTORY) -> "LossHistory":
    return LossHistory(
        losses=jnp.zeros((num_timesteps, size), jnp.float32),
        counts=jnp.zeros((num_timesteps,), jnp.int32),
    )


def probabilities(history: LossHistory) -> jax.Array:
    """p_t ∝ √(mean of the stored L_t²), mixed with UNIFORM_SHARE of the uniform; uniform
    until every t has a full history."""
    num_timesteps, size = history.losses.shape
    weights = jnp.sqrt(jnp.mean(jnp.square(history.losses), axis=-1))
    p = weights / jnp.sum(weights)
    p = (1.0 - UNIFORM_SHARE) * p + UNIFORM_SHARE / num_timesteps
    warm = jnp.all(history.counts >= size)
    return jnp.where(warm, p, jnp.full_like(p, 1.0 / num_timesteps))


def sample(
    rng: jax.Array, history: LossHistory | None, batch_size: int, num_timesteps: int
) -> tuple[jax.Array, jax.Array | None]:
    """(t, weights) for a batch: t ~ Uniform{0..T-1} with weights None when history is None
    (the uniform sampler), else t ~ p_t with weights 1/(T p_t)."""
    if history is None:
        return jax.random.randint(rng, (batch_size,), 0, num_timesteps), None
    p = probabilities(history)
    t = jax.random.choice(rng, num_timesteps, (batch_size,), p=p)
    return t, 1.0 / (num_timesteps * p[t])


def _ranks(t):
    """For each example, how many earlier examples of the batch have the same t."""
    order = jnp.argsort(t, stable=True)
    sorted_t = t[order]
    first = jnp.searchsorted(sorted_t, sorted_t, side="left")
    ranks_sorted = jnp.arange(t.shape[0]) - first
    return jnp.zeros_like(t).at[order].set(ranks_sorted)


def update(history: LossHistory, t: jax.Array, losses: jax.Array) -> LossHistory:
    """The history after the batch's losses, appended at their t in batch order (the last
    HISTORY kept), without a loop over the batch: the new row of t is the tail of
    [old row, the n_t new losses], i.e. slot k holds old[n_t + k] if n_t + k < HISTORY,
    else the new loss of rank n_t + k - HISTORY."""
    num_timesteps, size = history.losses.shape
    losses = jax.lax.stop_gradient(losses).astype(jnp.float32)
    n = jnp.zeros((num_timesteps,), jnp.int32).at[t].add(1)
    slot = _ranks(t) - n[t] + size  # < 0 for losses pushed out within this batch
    slot = jnp.where(slot >= 0, slot, size)  # out of range: dropped by the scatter
    new = jnp.zeros_like(history.losses).at[t, slot].set(losses, mode="drop")
    index = n[:, None] + jnp.arange(size)[None, :]
    old = jnp.take_along_axis(history.losses, jnp.minimum(index, size - 1), axis=1)
    rows = jnp.where(index < size, old, new)
    return LossHistory(losses=rows, counts=jnp.minimum(history.counts + n, size))
