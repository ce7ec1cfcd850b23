"""Evaluation: the variational bound in bits/dim over a split, Fréchet distance, IS.

The bound (eq. 5) is computed for every example of the split over all T steps with the
discretized decoder and the prior term, sharded over devices and processes; its per-step
terms give the rate / distortion curve of the paper's Table 4 and Fig. 5.
"""

import functools

import jax
import numpy as np
import scipy.linalg
from jax.experimental import multihost_utils

from ddpm_jax import diffusion, input_pipeline, sharding

# ---- Variational bound over a split ------------------------------------------------------


def bpd_step(params, x0, rng, *, config, model, sched):
    """diffusion.bpd_loop for one batch with the network as ε_θ (x̂_0 clipped, as the authors)."""
    d = config.diffusion
    model_fn = lambda x, t: model.apply({"params": params}, x, t)
    return diffusion.bpd_loop(sched, model_fn, x0, rng, d.mean_type, d.var_type, clip_x0=True)


def jit_bpd_step(config, model, sched, mesh):
    fn = functools.partial(bpd_step, config=config, model=model, sched=sched)
    batch, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    return jax.jit(fn, in_shardings=(rep, batch, rep), out_shardings=batch)


def evaluate_bpd(config, model, sched, params, batch_size, seed=0, devices=None, max_batches=None):
    """The bound for every example of config.data.eval_split (or its first max_batches
    batches of the global batch_size). Returns per-example arrays (N, ...): batch by batch,
    each batch's rows in process order."""
    mesh = sharding.make_mesh(devices)
    step = jit_bpd_step(config, model, sched, mesh)
    per_process = sharding.per_process_batch_size(batch_size)
    ds, _ = input_pipeline.eval_dataset(
        config, per_process, jax.process_index(), jax.process_count()
    )
    params = jax.device_put(params, sharding.replicated(mesh))
    rng, outs, masks = jax.random.PRNGKey(seed), [], []
    for i, (x0, mask) in enumerate(ds.as_numpy_iterator()):
        if max_batches is not None and i >= max_batches:
            break
        outs.append(step(params, sharding.global_batch(x0, mesh), jax.random.fold_in(rng, i)))
        masks.append(sharding.global_batch(mask, mesh))
    # One gather to every host, at the end; padded examples are dropped.
    outs, masks = multihost_utils.process_allgather((outs, masks), tiled=True)
    keep = np.concatenate([np.asarray(m) for m in masks]) > 0
    return {k: np.concatenate([np.asarray(o[k]) for o in outs])[keep] for k in outs[0]}


def summarize_bpd(result):
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


# ---- Sample quality ---------------------------------------------------------------------


def feature_statistics(features):
    """Mean and covariance (ddof 1) of (N, D) features, in float64."""
    features = np.asarray(features, np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FID: |μ1 - μ2|² + tr(Σ1) + tr(Σ2) - 2 tr((Σ1 Σ2)^{1/2}), in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}"
        )
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):  # singular product: regularise as is customary
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(np.real(covmean)))


def inception_score(probs, num_splits=10):
    """IS = exp(E_x KL(p(y|x) || p(y))) over each of num_splits splits: (mean, std)."""
    probs = np.asarray(probs, np.float64)
    if len(probs) < num_splits:
        raise ValueError(f"need at least num_splits={num_splits} examples, got {len(probs)}")
    scores = []
    for part in np.array_split(probs, num_splits):
        p_y = part.mean(0, keepdims=True)
        kl = np.sum(
            part * (np.log(np.maximum(part, 1e-30)) - np.log(np.maximum(p_y, 1e-30))), axis=1
        )
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))
