"""FID and IS: the formulas, the classifier, cached dataset statistics, sample quality."""

from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import fid_file, mnist_data_dir

from ddpm_jax import (
    config_lib,
    feature_metrics,
    fid,
    fs,
    images,
    inception,
    input_pipeline,
    sampling,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def network():
    return fid.load_network(fid_file())


def reference_features(params, images_uint8):
    """pool3 features by the plain route: uint8 pixels -> preprocess -> network."""
    return np.asarray(jax.jit(inception.features)(params, inception.preprocess(images_uint8)))


def random_stats(rng, d=16, n=200):
    f = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + rng.standard_normal(d)
    return fid.feature_statistics(f)


def direct_fid(mu1, s1, mu2, s2):
    """Through the symmetric form tr((Σ1^½ Σ2 Σ1^½)^½), by eigendecompositions only."""
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(np.maximum(w, 0))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return (
        np.sum((mu1 - mu2) ** 2)
        + np.trace(s1)
        + np.trace(s2)
        - 2 * np.sum(np.sqrt(np.maximum(inner, 0)))
    )


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a, b = random_stats(rng), random_stats(rng)
    assert abs(fid.frechet_distance(*a, *a)) < 1e-8 * np.trace(a[1])
    ab, ba = fid.frechet_distance(*a, *b), fid.frechet_distance(*b, *a)
    np.testing.assert_allclose(ab, ba, rtol=1e-9)
    np.testing.assert_allclose(ab, direct_fid(*a, *b), rtol=1e-8)
    assert ab > 0
    # Equal covariances: the distance is the squared distance of the means.
    np.testing.assert_allclose(fid.frechet_distance(a[0], a[1], a[0] + 1, a[1]), 16.0, rtol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        fid.frechet_distance(a[0], a[1], a[0][:3], a[1][:3, :3])


def test_inception_score_closed_forms():
    assert fid.inception_score(np.full((100, 10), 0.1))[0] == pytest.approx(1.0)
    one_hot = np.eye(7)[np.arange(700) % 7]  # 7 equally frequent, certain classes
    mean, std = fid.inception_score(one_hot)
    assert mean == pytest.approx(7.0) and std == pytest.approx(0.0, abs=1e-9)
    # Two halves: p(y|x) = (0.9, 0.1) or (0.1, 0.9); p(y) = (0.5, 0.5).
    probs = np.array([[0.9, 0.1], [0.1, 0.9]] * 50)
    kl = 0.9 * np.log(0.9 / 0.5) + 0.1 * np.log(0.1 / 0.5)
    assert fid.inception_score(probs, num_splits=5)[0] == pytest.approx(np.exp(kl))
    with pytest.raises(ValueError, match="num_splits"):
        fid.inception_score(one_hot[:5])


def flat_tensors(variables):
    """Flax variables back to the file's names and layouts (OIHW kernels)."""
    names = {"kernel": "weight", "beta": "beta", "mean": "mean", "var": "var"}
    flat = {}
    for path, value in jax.tree_util.tree_flatten_with_path(variables)[0]:
        *layer, leaf = (k.key for k in path[1:])  # path[0] is the collection
        value = np.transpose(value, (3, 2, 0, 1)) if leaf == "kernel" else value
        flat[".".join(["net.layers", *layer, names[leaf]])] = value
    return flat


def test_classifier_probabilities(network):
    params, _ = network
    with pytest.raises(ValueError, match="1008-way classifier"):
        inception.class_probabilities(params, np.zeros((1, 2048), np.float32))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((1008, 2048)).astype(np.float32) * 0.01
    flat = dict(flat_tensors(params), **{"net.output.weight": w, "net.output.bias": w[:, 0]})
    with_classifier = inception.params_from_tensors(flat)
    assert inception.has_classifier(with_classifier)
    assert jax.tree.all(jax.tree.map(np.array_equal, params["params"]["mixed_4"],
                                      with_classifier["params"]["mixed_4"]))  # fmt: skip
    pool3 = rng.uniform(0, 2, (3, 2048)).astype(np.float32)
    logits = pool3.astype(np.float64) @ w.T.astype(np.float64)  # no bias, as the original IS
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    probs = np.asarray(inception.class_probabilities(with_classifier, pool3))
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match=r"\(1008, 2048\)"):
        inception.params_from_tensors(dict(flat, **{"net.output.weight": w[:10]}))
    with pytest.raises(ValueError, match="376"):
        inception.params_from_tensors({k: v for k, v in flat.items() if "mixed_4" not in k})


def test_load_network_names_the_missing_file(tmp_path):
    with pytest.raises(ValueError, match="config.eval.inception_path"):
        fid.load_network(None)
    with pytest.raises(ValueError, match="config.eval.inception_path"):
        fid.load_network(tmp_path / "missing.pt")


def tiny_config():
    config = config_lib.load_config(ROOT / "configs" / "tiny.py")
    config.data.data_dir = str(mnist_data_dir())
    return config


def test_dataset_statistics_sharded_and_cached(network, tmp_path, monkeypatch):
    config, split = tiny_config(), "test[:10]"
    mu, sigma, n, kept = fid.dataset_statistics(config, network, split, tmp_path, batch_size=8)
    # Independently: the pipeline's images as uint8, the network on one device.
    ds, _ = input_pipeline.eval_dataset(config, 10, split=split)
    x0, mask, _ = next(ds.as_numpy_iterator())
    assert n == 10 and mask.sum() == 10
    feats = reference_features(network[0], images.to_uint8(x0))
    np.testing.assert_allclose(mu, feats.mean(0), atol=1e-5)
    np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False), atol=1e-5)
    np.testing.assert_allclose(kept, feats, atol=1e-5)  # for KID and precision/recall
    path = fid.stats_path(tmp_path, config, split)
    assert path.name.startswith("mnist_test-10_8x8x1_") and path.is_file()
    halves = {fid.stats_path(tmp_path, config, s) for s in ("test[:50]", "test[50:]")}
    assert len(halves) == 2  # the same readable name, told apart by the hash
    # A second call reads the cache and runs nothing; another network's cache is redone.
    monkeypatch.setattr(fid, "make_activations_fn", lambda *a: pytest.fail("recomputed"))
    cached = fid.dataset_statistics(config, network, split, tmp_path, batch_size=8)
    np.testing.assert_array_equal(cached[1], sigma)
    with pytest.raises(pytest.fail.Exception, match="recomputed"):
        fid.dataset_statistics(config, (network[0], "another"), split, tmp_path, batch_size=8)
    assert not list(tmp_path.glob(".*tmp*"))
    # A cache written before KID (no features) serves FID, and is redone for KID / PR.
    fs.save_npz(path, mu=mu, sigma=sigma, num_examples=n, network_id=network[1])
    assert fid.dataset_statistics(config, network, split, tmp_path, batch_size=8).features is None
    with pytest.raises(pytest.fail.Exception, match="recomputed"):
        fid.dataset_statistics(config, network, split, tmp_path, batch_size=8, features=True)


def test_sample_quality_equals_the_plain_route(network, tiny_model):
    config, _, params = tiny_model
    mu, sigma = np.zeros(2048), np.eye(2048)
    sampler = sampling.make_sample_fn(config)
    acts = fid.SampleActivations(sampler, network)
    result = fid.sample_quality(acts, params, 6, (mu, sigma), seed=3)
    samples = sampler(params, jax.random.PRNGKey(3), 6)
    feats = reference_features(network[0], samples)
    expected = fid.frechet_distance(*fid.feature_statistics(feats), mu, sigma)
    assert result["num_samples"] == 6 and "is" not in result
    np.testing.assert_allclose(result["fid"], expected, rtol=1e-5)
    # KID and precision/recall from the same pass, against a Reference's features.
    real = np.random.default_rng(0).normal(size=(12, 2048)).astype(np.float32) + feats.mean(0)
    reference = fid.Reference(mu, sigma, 12, real)
    more = fid.sample_quality(acts, params, 6, reference, 3, metrics=("kid", "pr"))
    assert "fid" not in more and "is" not in more
    kid = feature_metrics.kid(real, feats, seed=3)
    np.testing.assert_allclose((more["kid"], more["kid_std"]), kid, rtol=1e-4, atol=1e-6)
    pr = feature_metrics.precision_recall(real, feats)
    assert (more["precision"], more["recall"]) == pr
