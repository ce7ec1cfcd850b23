"""Sample quality: FID and Inception Score with the FID Inception-v3 (ddpm_jax.inception).

Images enter as pixels k = round((x + 1) · 127.5) in 0..255 (what `images.to_uint8`
saves), are resized to 299x299 with TF1's legacy bilinear resize and scaled to
(k - 128) / 128: the convention of the TF graph behind the usual FID numbers. Grey
images are repeated to 3 channels.

The reference statistics (μ, Σ of the 2048-d pool3 features over every example of a
dataset split, after the training pipeline's resize to config.data.image_size) are cached
as STATS_DIR/<dataset>_<split>_<H>x<W>x<C>.npz. The paper's FID is against the training
set (Ho et al. 2020, Table 1: 3.17 on CIFAR10 train, 5.24 on test). The cache also keeps
the features of the split's first REFERENCE_FEATURES examples, for KID and precision /
recall (feature_metrics.py), which use the same feature pass of the samples as FID.
"""

import hashlib
import logging
import re
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np
import scipy.linalg
from etils import epath
from jax.experimental import multihost_utils

from ddpm_jax import bound, feature_metrics, fs, guidance, images, inception, sharding
from ddpm_jax.errors import UserError

# ---- The formulas ------------------------------------------------------------------------


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (ddof 1) of (N, D) features, in float64."""
    features = np.asarray(features, np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """FID: |μ1 - μ2|² + tr(Σ1) + tr(Σ2) - 2 tr((Σ1 Σ2)^{1/2}), in float64. With fewer than
    2049 examples Σ is singular; the value is still defined but biased upward (small N)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}"
        )
    with warnings.catch_warnings():  # a singular product is handled below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):  # singular product: regularise as is customary
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(np.real(covmean)))


def inception_score(probs: np.ndarray, num_splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) over each of num_splits splits: (mean, std)."""
    probs = np.asarray(probs, np.float64)
    if len(probs) < num_splits:
        raise ValueError(f"need at least num_splits={num_splits} examples, got {len(probs)}")
    scores = []
    for part in np.array_split(probs, num_splits):
        log_p_y = np.log(np.maximum(part.mean(0, keepdims=True), 1e-30))
        kl = np.sum(part * (np.log(np.maximum(part, 1e-30)) - log_p_y), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


SAMPLE_METRICS = ("fid", "is", "kid", "pr")
REFERENCE_FEATURES = 10_000  # the reference features kept for KID and precision/recall


class Reference(NamedTuple):
    """A dataset split's pool3 statistics, and the features of its first examples."""

    mu: np.ndarray
    sigma: np.ndarray
    num_examples: int
    features: np.ndarray | None = None  # at most REFERENCE_FEATURES rows


# ---- Activations -------------------------------------------------------------------------


def activations(params, x: jax.Array) -> dict[str, jax.Array]:
    """Images x in [-1, 1] (NHWC, 1 or 3 channels) -> {'pool3': (B, 2048)} and, when the
    network has its classifier, 'probs': (B, 1008)."""
    pool3 = inception.features(params, inception.preprocess(images.quantize(x)))
    out = {"pool3": pool3}
    if inception.has_classifier(params):
        out["probs"] = inception.class_probabilities(params, pool3)
    return out


def make_activations_fn(inception_params, mesh: jax.sharding.Mesh) -> Callable:
    """activations as one jitted function of a batch sharded over the mesh."""
    rep, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    params = jax.device_put(inception_params, rep)
    jitted = jax.jit(activations, in_shardings=(rep, batch), out_shardings=batch)
    return lambda x: jitted(params, x)


def network_id(path) -> str:
    """The first 16 hex digits of the network file's sha256 (stored with cached statistics)."""
    digest = hashlib.sha256()
    with fs.as_path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def load_network(path) -> tuple[dict, str]:
    """(params, network_id) of the Inception file, or a clear error saying how to get it."""
    if path is None or not fs.as_path(path).is_file():
        problem = "no file is set" if path is None else f"{str(path)!r} does not exist"
        raise UserError(
            f"FID/IS need the Inception network file and {problem}; pass "
            "--config.eval.inception_path=/path/to/inception-2015-12-05.pt (README: 'FID and IS')"
        )
    return inception.load_params(path), network_id(path)


# ---- Reference statistics of a dataset split --------------------------------------------


def stats_path(stats_dir, config, split: str) -> epath.Path:
    """<dataset>_<split>_<H>x<W>x<C>_<hash>.npz: readable, and the hash of the exact
    (dataset, split) strings keeps 'test[:5000]' and 'test[5000:]' apart."""
    d = config.data
    name = "_".join(re.sub(r"[^A-Za-z0-9.]+", "-", s).strip("-") for s in (d.dataset, split))
    digest = hashlib.sha1(f"{d.dataset}\n{split}".encode()).hexdigest()[:8]
    size = f"{d.image_size}x{d.image_size}x{d.num_channels}" + ("-pad" if d.get("pad") else "")
    return fs.as_path(stats_dir) / f"{name}_{size}_{digest}.npz"


def _read_cache(path, net_id, features: bool):
    if not path.is_file():
        return None
    cached = fs.load_npz(path)
    if str(cached["network_id"]) != net_id:
        logging.warning("%s was computed with another Inception file: recomputing", path)
        return None
    if features and "features" not in cached:  # written before KID: no features kept
        return None
    kept = cached.get("features")
    return Reference(cached["mu"], cached["sigma"], int(cached["num_examples"]), kept)


def _write_cache(path, reference: Reference, net_id):
    """Written whole (fs.write_bytes): a cache file is never partial."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mu, sigma, num, features = reference
    fs.save_npz(path, mu=mu, sigma=sigma, num_examples=num, network_id=net_id, features=features)


def dataset_statistics(
    config, network, split: str, stats_dir, batch_size: int, devices=None, progress=False,
    features=False,
) -> Reference:  # fmt: skip
    """The Reference of the pool3 features of every example of `split`, read from the
    cache in stats_dir or computed (sharded over all devices and processes) and cached
    there. network = load_network(path). features=True: a cache without the reference
    features (written by an older version) is recomputed."""
    params, net_id = network
    path = stats_path(stats_dir, config, split)
    cached = _read_cache(path, net_id, features)
    if jax.process_count() > 1:  # computing is collective: all read the cache, or none
        found = multihost_utils.process_allgather(np.int32(cached is not None))
        cached = cached if np.all(found) else None
    if cached is not None:
        return cached
    mesh = sharding.make_mesh(devices)
    act = make_activations_fn(params, mesh)
    feats = bound.map_split(
        lambda x, i, *_: act(x)["pool3"], config, batch_size, mesh, split=split, progress=progress
    )
    mu, sigma = feature_statistics(feats)
    reference = Reference(mu, sigma, len(feats), np.asarray(feats[:REFERENCE_FEATURES], np.float32))
    if jax.process_index() == 0:
        _write_cache(path, reference, net_id)
    return reference


# ---- Samples -----------------------------------------------------------------------------


class SampleActivations:
    """fn(params, rng, num_samples) -> activations of samples 0 .. num_samples-1 of `rng`
    (as sampling.Sampler draws them; a class model's cycle through its classes, at the
    sampler's guidance), computed chunk by chunk on the devices so that only activations
    are kept. `sampler` is a sampling.Sampler, whose devices the network runs on too.
    Build it once: the sampler and the network compile once."""

    def __init__(self, sampler, network: tuple[dict, str]):
        self.sampler = sampler
        self.activations = make_activations_fn(network[0], sampler.mesh)

    def __call__(self, params, rng: jax.Array, num_samples: int) -> dict[str, np.ndarray]:
        labels = guidance.balanced_labels(self.sampler.setup.num_classes, num_samples)
        chunks = self.sampler.chunks(params, rng, num_samples, labels)
        outs = [jax.block_until_ready(self.activations(chunk)) for chunk in chunks]
        outs = multihost_utils.process_allgather(outs, tiled=True)  # once, at the end
        return {k: np.concatenate([np.asarray(o[k]) for o in outs])[:num_samples] for k in outs[0]}


def sample_quality(
    activations_fn: SampleActivations, params, num_samples: int, reference, seed: int = 0,
    metrics=("fid", "is"),
) -> dict:  # fmt: skip
    """{'num_samples'} and the asked-for `metrics` (SAMPLE_METRICS) of num_samples samples
    of PRNGKey(seed), from one feature pass: 'fid' against reference (a Reference, or
    (μ, Σ)); 'is' and 'is_std' (10 splits) when the network has its classifier; 'kid' and
    'kid_std' (100 subsets of up to 1000) and 'precision' and 'recall' (k = 3) against
    reference.features."""
    acts = activations_fn(params, jax.random.PRNGKey(seed), num_samples)
    result, fake = {"num_samples": num_samples}, acts["pool3"]
    if "fid" in metrics and reference is not None:
        result["fid"] = frechet_distance(*feature_statistics(fake), *reference[:2])
    if "is" in metrics and "probs" in acts:
        result["is"], result["is_std"] = inception_score(acts["probs"])
    if "kid" in metrics:
        result["kid"], result["kid_std"] = feature_metrics.kid(reference.features, fake, seed=seed)
    if "pr" in metrics:
        result["precision"], result["recall"] = feature_metrics.precision_recall(
            reference.features, fake
        )
    return result
