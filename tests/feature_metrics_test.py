"""feature_metrics: KID against the closed form of MMD² for Gaussian features (unbiased at
any subset size), and precision/recall against their definition restated with loops."""

import numpy as np
import pytest

from ddpm_jax import feature_metrics


def expected_kernel(a, s, b, t):
    """E (x·y/d + 1)³ for independent x ~ N(a, s² I), y ~ N(b, t² I) in d dimensions, from
    the moments of u = x·y: given y, u ~ N(a·y, s²|y|²); then over y = b + t z."""
    d, ab = len(a), float(a @ b)
    e1 = ab
    e2 = ab**2 + t**2 * (a @ a) + s**2 * (b @ b + d * t**2)
    e3 = ab**3 + 3 * ab * t**2 * (a @ a) + 3 * s**2 * ab * (b @ b + t**2 * (d + 2))
    return e3 / d**3 + 3 * e2 / d**2 + 3 * e1 / d + 1


def closed_form_mmd2(a, s, b, t):
    """MMD² = E k(x, x') + E k(y, y') - 2 E k(x, y), each pair independent."""
    return (
        expected_kernel(a, s, a, s) + expected_kernel(b, t, b, t) - 2 * expected_kernel(a, s, b, t)
    )


def test_kid_is_unbiased_and_matches_the_closed_form_for_gaussian_features():
    rng, d = np.random.default_rng(0), 16
    a, b = np.zeros(d), np.full(d, 0.4)
    real = rng.normal(size=(4000, d))
    fake = b + 1.3 * rng.normal(size=(4000, d))
    want = closed_form_mmd2(a, 1.0, b, 1.3)
    assert want > 0.1
    for subset_size in (50, 400):  # the mean does not depend on the subset size
        mean, std = feature_metrics.kid(real, fake, num_subsets=100, subset_size=subset_size)
        assert abs(mean - want) < std, (subset_size, mean, want, std)
        assert mean > 3 * std / np.sqrt(100)
    # Against another draw of the same distribution, and against itself: about 0.
    again = rng.normal(size=(4000, d))
    for other in (again, real):
        mean, std = feature_metrics.kid(real, other, num_subsets=100, subset_size=400)
        assert abs(mean) < std and std < 0.1 * want
    with pytest.raises(ValueError, match="at least 2"):
        feature_metrics.kid(real[:1], fake)


def restated_precision_recall(real, fake, k=3):
    """The definition, one point at a time."""

    def radius(points, i):
        return sorted(np.linalg.norm(points - points[i], axis=1))[k]

    def inside(p, centres):
        return any(np.linalg.norm(p - c) <= radius(centres, j) for j, c in enumerate(centres))

    precision = np.mean([inside(f, real) for f in fake])
    return precision, np.mean([inside(r, fake) for r in real])


def test_precision_recall_follow_their_definition():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(60, 5))
    fake = np.concatenate([rng.normal(size=(30, 5)), 4.0 + rng.normal(size=(30, 5))])
    got = feature_metrics.precision_recall(real, fake)
    want = restated_precision_recall(real, fake)
    np.testing.assert_allclose(got, want)
    assert 0.3 < got[0] < 0.7  # half the generated set is off the real one
    assert feature_metrics.precision_recall(real, real) == (1.0, 1.0)
    far = feature_metrics.precision_recall(real, real + 100.0)
    assert far == (0.0, 0.0)
    small_chunks = feature_metrics.coverage(fake, real, np.ones(60), chunk=7)
    assert small_chunks == feature_metrics.coverage(fake, real, np.ones(60))
