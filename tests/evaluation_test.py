"""Evaluation: the bound over a split (sharded = unsharded), Fréchet distance, IS."""

from pathlib import Path

import jax
import numpy as np
import pytest

from ddpm_jax import config_lib, evaluation

ROOT = Path(__file__).resolve().parents[1]


def random_stats(rng, d=16, n=200):
    f = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + rng.standard_normal(d)
    return evaluation.feature_statistics(f)


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
    assert abs(evaluation.frechet_distance(*a, *a)) < 1e-8 * np.trace(a[1])
    ab, ba = evaluation.frechet_distance(*a, *b), evaluation.frechet_distance(*b, *a)
    np.testing.assert_allclose(ab, ba, rtol=1e-9)
    np.testing.assert_allclose(ab, direct_fid(*a, *b), rtol=1e-8)
    assert ab > 0
    # Equal covariances: the distance is the squared distance of the means.
    np.testing.assert_allclose(
        evaluation.frechet_distance(a[0], a[1], a[0] + 1, a[1]), 16.0, rtol=1e-6
    )
    with pytest.raises(ValueError, match="shape"):
        evaluation.frechet_distance(a[0], a[1], a[0][:3], a[1][:3, :3])


def test_inception_score_closed_forms():
    assert evaluation.inception_score(np.full((100, 10), 0.1))[0] == pytest.approx(1.0)
    one_hot = np.eye(7)[np.arange(700) % 7]  # 7 equally frequent, certain classes
    mean, std = evaluation.inception_score(one_hot)
    assert mean == pytest.approx(7.0) and std == pytest.approx(0.0, abs=1e-9)
    # Two halves: p(y|x) = (0.9, 0.1) or (0.1, 0.9); p(y) = (0.5, 0.5).
    probs = np.array([[0.9, 0.1], [0.1, 0.9]] * 50)
    kl = 0.9 * np.log(0.9 / 0.5) + 0.1 * np.log(0.1 / 0.5)
    assert evaluation.inception_score(probs, num_splits=5)[0] == pytest.approx(np.exp(kl))
    with pytest.raises(ValueError, match="num_splits"):
        evaluation.inception_score(one_hot[:5])


def test_bound_over_a_split_sharded_equals_unsharded(tiny_model):
    config, model, params = tiny_model
    config = config.copy_and_resolve_references()
    config.data.eval_split = "test[:20]"
    sched = config_lib.make_schedule(config)
    four = evaluation.evaluate_bpd(config, model, sched, params, batch_size=8)
    one = evaluation.evaluate_bpd(
        config, model, sched, params, batch_size=8, devices=jax.devices()[:1]
    )
    assert four["total_bpd"].shape == (20,) and four["terms_bpd"].shape == (
        20,
        20,
    )  # padding dropped
    for key in four:
        np.testing.assert_allclose(four[key], one[key], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        four["terms_bpd"].sum(1) + four["prior_bpd"], four["total_bpd"], rtol=1e-6
    )
    assert np.all(four["terms_bpd"] >= 0) and np.all(four["prior_bpd"] >= 0)
    summary = evaluation.summarize_bpd(four)
    assert summary["num_examples"] == 20 and summary["bpd_stderr"] > 0
    np.testing.assert_allclose(summary["rate_bpd"][0], summary["bpd"], rtol=1e-5)
    assert np.all(np.diff(summary["rate_bpd"]) <= 0)  # rate accumulates from t = T-1 down to 0
