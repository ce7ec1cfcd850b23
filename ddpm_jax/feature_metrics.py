"""Sample-quality metrics of Inception features beyond FID, usable at small N.

- KID (Bińkowski et al. 2018): the unbiased estimate of MMD² between the feature
  distributions with the cubic polynomial kernel k(x, y) = (x·y/d + 1)³, averaged over
  `num_subsets` random subsets of `subset_size` features of each set (mean and std over
  subsets), as torch-fidelity and clean-fid define it (100 subsets of 1000 by default):

      MMD²_u = Σ_{i≠j} [k(x_i, x_j) + k(y_i, y_j)] / (m(m-1)) - 2 Σ_{i,j} k(x_i, y_j) / m²

  Unlike FID it is unbiased: its expectation does not depend on m, and it is 0 in
  expectation (and can be negative) when both sets come from one distribution.
- Precision and recall (Kynkäänniemi et al. 2019): each real feature's ball reaches its
  k-th nearest real neighbour (k = 3); precision is the fraction of generated features
  inside some real ball, recall the fraction of real features inside some generated ball
  (the same construction on the generated set).
"""

import numpy as np


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(x·y/d + 1)³ for every pair of rows, in float64."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD² of two equal-size sets with the cubic polynomial kernel."""
    m = len(x)
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / m**2)


def kid(
    real: np.ndarray, fake: np.ndarray, num_subsets: int = 100, subset_size: int = 1000, seed=0
) -> tuple[float, float]:
    """(mean, std) of MMD²_u over subsets drawn without replacement from each set; the
    subset size is capped at the smaller set's size (at least 2)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise ValueError(
            f"KID needs at least 2 features in each set, got {len(real)} and {len(fake)}"
        )
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        x = real[rng.choice(len(real), m, replace=False)]
        values.append(mmd2_unbiased(x, fake[rng.choice(len(fake), m, replace=False)]))
    return float(np.mean(values)), float(np.std(values))


def kth_neighbour_distances(features: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Each feature's distance to its k-th nearest other feature of the set."""
    parts = [
        np.partition(_distances(features[i : i + chunk], features), k, axis=1)[:, k]
        for i in range(0, len(features), chunk)
    ]  # the 0th is the feature itself
    return np.concatenate(parts)


def coverage(
    queries: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk: int = 1024
) -> float:
    """The fraction of queries within radii[j] of some centre j."""
    inside = [
        np.any(_distances(queries[i : i + chunk], centres) <= radii[None], axis=1)
        for i in range(0, len(queries), chunk)
    ]
    return float(np.mean(np.concatenate(inside)))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of the generated features against the real ones."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k = {k} need more than {k} features in each set")
    precision = coverage(fake, real, kth_neighbour_distances(real, k))
    recall = coverage(real, fake, kth_neighbour_distances(fake, k))
    return precision, recall


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances of every row of a to every row of b."""
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(squared, 0.0))
