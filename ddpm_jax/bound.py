"""The variational bound (NLL) in bits/dim over a dataset split.

The bound (eq. 5) is computed for every example of the split over all T steps with the
discretized decoder and the prior term, sharded over devices and processes; its per-step
terms give the rate / distortion curve of the paper's Table 4 and Fig. 5.
"""

import dataclasses
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from ddpm_jax import diffusion, first_stage, sharding
from ddpm_jax.progress import Progress
from ddpm_jax.spec import Setup

# ---- Variational bound over a split ------------------------------------------------------


def bpd_step(params, x0: jax.Array, rng, labels=None, *, setup: Setup) -> dict[str, jax.Array]:
    """diffusion.bpd_loop for one batch with the setup's network and spec (x̂_0 clipped, as
    the authors; not a latent model's); a class model's bound is that given each example's
    label. A latent model's (params a first_stage.LatentModel) is the bound of the scaled
    posterior mean's latents: bits per latent dimension, with the decoder L_0 of 8-bit
    data."""
    if setup.latent is not None:
        x0 = first_stage.encode_mean(setup.latent, params.autoencoder, x0, params.scale)
        params = params.unet
    spec = dataclasses.replace(setup.diffusion, clip_x0=setup.latent is None)
    model_fn = lambda x, t: setup.model.apply({"params": params}, x, t, labels)  # noqa: E731
    return diffusion.bpd_loop(setup.schedule, spec, model_fn, x0, rng)


def jit_bpd_step(setup: Setup, mesh: jax.sharding.Mesh) -> Callable:
    """(params, x0, index, rng[, labels]) -> per-example arrays, one jitted program: example
    i's noise comes from fold_in(rng, index_i)."""

    def fn(params, x0, index, rng, labels=None):
        return bpd_step(params, x0, diffusion.example_keys(rng, index), labels, setup=setup)

    batch, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    return jax.jit(fn, in_shardings=(rep, batch, batch, rep, batch), out_shardings=batch)


def map_split(
    step: Callable, config, batch_size: int, mesh: jax.sharding.Mesh, split: str | None = None,
    max_batches: int | None = None, progress: bool = False,
) -> dict[str, np.ndarray]:  # fmt: skip
    """step(x0, index[, labels]) on every batch of `split` (default config.data.eval_split):
    x0 is the global batch (batch_size images in [-1, 1]) sharded over the mesh, index each
    row's position in the split, labels (a class model's) theirs, and step returns
    per-example arrays. Returns them for every
    example in the order of the split, padding dropped, gathered to every host once, at
    the end."""
    from ddpm_jax import input_pipeline  # TensorFlow: only where data is read

    per_process = sharding.per_process_batch_size(batch_size)
    ds, num = input_pipeline.eval_dataset(
        config, per_process, jax.process_index(), jax.process_count(), split
    )
    total = (
        -(-num // per_process) if max_batches is None else min(max_batches, -(-num // per_process))
    )
    bar = Progress(total, progress, "batches", unit="batch")
    outs, masks, indices = [], [], []
    for x0, mask, index, *labels in ds.take(total).as_numpy_iterator():
        batch = sharding.global_batch((x0, index.astype(np.int32), mask, *labels), mesh)
        x0, index, mask, *labels = batch
        outs.append(step(x0, index, *labels))
        masks.append(mask)
        indices.append(index)
        if len(outs) > 1:  # one batch stays in flight; the bar counts finished ones
            jax.block_until_ready(outs[-2])
            bar.update(1, outs[-2])
    if outs:
        bar.update(1, outs[-1])
    bar.close()
    outs, masks, indices = multihost_utils.process_allgather((outs, masks, indices), tiled=True)
    keep = np.concatenate(masks) > 0
    order = np.argsort(np.concatenate(indices)[keep], kind="stable")
    return jax.tree.map(lambda *o: np.concatenate(o)[keep][order], *outs)


def evaluate_bpd(
    config, setup: Setup, params, batch_size: int, seed: int = 0, devices=None,
    max_batches: int | None = None, progress: bool = False, step_fn=None,
) -> dict[str, np.ndarray]:  # fmt: skip
    """The bound of `setup`'s model for every example of config.data.eval_split (the data
    are the config's: map_split reads them) or its first max_batches
    batches of the global batch_size): per-example arrays (N, ...) as map_split returns.
    Example i's noise comes from fold_in(PRNGKey(seed), i): its bound does not depend on
    the batch size or the number of devices and processes. step_fn: a jit_bpd_step
    result (on the same devices) to reuse."""
    mesh = sharding.make_mesh(devices)
    fn = step_fn or jit_bpd_step(setup, mesh)
    params = jax.device_put(params, sharding.replicated(mesh))
    rng = jax.random.PRNGKey(seed)
    step = lambda x0, index, labels=None: fn(params, x0, index, rng, labels)
    return map_split(step, config, batch_size, mesh, max_batches=max_batches, progress=progress)


def summarize_bpd(result: dict[str, np.ndarray]) -> dict:
    """Mean and standard error of the total, the mean per-step terms, and the rate /
    distortion curve: rate(t) = L_T + Σ_{s ≥ t} L_s (bits/dim) and distortion(t) = RMSE of
    x̂_0 on the [0, 255] scale, for t = 0..T-1 (the paper's Fig. 5)."""
    total = result["total_bpd"]
    terms = result["terms_bpd"].mean(0)
    rate = result["prior_bpd"].mean() + np.cumsum(terms[::-1])[::-1]
    distortion = np.sqrt(result["x0_mse"].mean(0)) * 127.5
    return dict(
        bpd=float(total.mean()),
        bpd_stderr=float(total.std(ddof=1) / np.sqrt(total.size)) if total.size > 1 else 0.0,
        num_examples=int(total.size),
        prior_bpd=float(result["prior_bpd"].mean()),
        decoder_bpd=float(terms[0]),
        terms_bpd=terms,
        rate_bpd=rate,
        distortion_rmse=distortion,
    )
