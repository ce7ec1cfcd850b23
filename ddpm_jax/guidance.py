"""Class labels at sampling time and classifier-free guidance (Ho & Salimans 2022).

A class model (num_classes = K > 0) is trained with its label replaced by
"no label" (∅, the embedding's row K) with probability label_dropout, so
one network gives both ε_θ(x_t, t, c) and ε_θ(x_t, t, ∅). Guided sampling uses
ε̃ = (1 + w) ε_θ(x_t, t, c) - w ε_θ(x_t, t, ∅), both halves in one batched network call.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.errors import UserError
from ddpm_jax.spec import DiffusionSpec, split_output

Apply = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]  # (x, t, y) -> output
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t, t) -> output


def null_labels(n: int, classes: int) -> jax.Array:
    """n times "no label" (the embedding row `classes`)."""
    return jnp.full((n,), classes, jnp.int32)


def combine(spec: DiffusionSpec, cond: jax.Array, uncond: jax.Array, w) -> jax.Array:
    """(1 + w)·cond - w·uncond on the mean part of two network outputs; a learned Σ_θ is
    the conditional one's."""
    cond_mean, cond_var = split_output(spec, cond)
    mean = (1.0 + w) * cond_mean - w * split_output(spec, uncond)[0]
    return mean if cond_var is None else jnp.concatenate([mean, cond_var], axis=-1)


def guided_model_fn(
    apply: Apply, spec: DiffusionSpec, labels: jax.Array, w, classes: int
) -> ModelFn:
    """model_fn(x_t, t) of guided sampling from apply(x, t, y): the conditional and the
    unconditional pass of each example as one call on a batch of twice the size, each
    example next to its copy, so that a batch sharded over devices stays where it is."""

    def model_fn(x, t):
        n = x.shape[0]
        pair = lambda a, b: jnp.stack([a, b], axis=1).reshape(2 * n, *a.shape[1:])  # noqa: E731
        y = pair(labels, null_labels(n, classes))
        out = apply(pair(x, x), pair(t, t), y)
        out = out.reshape(n, 2, *out.shape[1:])
        return combine(spec, out[:, 0], out[:, 1], w)

    return model_fn


def model_fn(
    apply: Apply, spec: DiffusionSpec, labels: jax.Array | None, w, classes: int
) -> ModelFn:
    """The network as model_fn(x_t, t) for sampling: apply(x, t) for an unconditional model;
    for a class model, whose labels must then be an array, one pass on the labels for
    w = None (no guidance: w = 0 needs no unconditional pass) or guided_model_fn."""
    if not classes:
        return lambda x, t: apply(x, t, None)
    if w is None:
        return lambda x, t: apply(x, t, labels)
    return guided_model_fn(apply, spec, labels, w, classes)


def check(
    classes: int, labels, guidance: float | None, num_samples: int, default_guidance: float = 0.0
) -> tuple[np.ndarray | None, float]:
    """(labels as int32 NumPy (num_samples,), w) for the sampler of a model with `classes`
    classes, with ∅ and w = 0 for labels=None (unconditional samples); (None, 0.0) for an
    unconditional model (classes = 0). guidance=None takes default_guidance (the
    sampler spec's)."""
    w = default_guidance if guidance is None else guidance
    if not classes:
        if labels is not None or guidance:
            raise UserError(
                "this model is unconditional (config.model.num_classes = 0): it takes no "
                "labels and no guidance"
            )
        return None, 0.0
    if labels is None:
        if guidance:
            raise UserError("guidance needs labels: pass labels=… (class indices)")
        return np.full((num_samples,), classes, np.int32), 0.0
    labels = np.asarray(labels)
    if labels.shape != (num_samples,) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(
            f"labels must be {num_samples} integers (one per sample), got shape "
            f"{labels.shape} of {labels.dtype}"
        )
    if labels.min() < 0 or labels.max() >= classes:
        bad = sorted({int(y) for y in labels if not 0 <= y < classes})
        raise UserError(f"labels must lie in [0, {classes - 1}], got {bad[:5]}")
    if not np.isfinite(w) or w < 0:
        raise UserError(f"guidance must be >= 0, got {w}")
    return labels.astype(np.int32), float(w)


def balanced_labels(classes: int, num_samples: int) -> np.ndarray | None:
    """0, 1, ..., K-1, 0, 1, ... for a class model of K = classes (grids and FID cover
    every class), else None."""
    return np.arange(num_samples) % classes if classes else None
