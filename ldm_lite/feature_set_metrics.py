"""Metrics of two Inception feature sets that need the features themselves (FID needs only their mean and
covariance: ldm_lite/quality.py).

KID (Binkowski et al. 2018, arXiv:1801.01401) is the unbiased squared MMD with the kernel
k(x, y) = (x.y / d + 1)^3 (the unbiased estimator is Lemma 6 of Gretton et al. 2012, JMLR 13), averaged over random
subsets as torch-fidelity does.

Improved precision and recall (Kynkaanniemi et al. 2019, arXiv:1904.06991) compare the two feature sets as
manifolds: unions of balls around each feature reaching its k-th nearest neighbour (k = 3).
"""
import torch


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x.y / d + 1)^3 for rows x (m, d), y (n, d) -> (m, n)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, Lemma 6; KID of Binkowski et al. 2018) between samples x (m, d) and
    y (n, d) under the cubic polynomial kernel, in float64:
    sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1)) - 2 sum_{i, j} k(x_i, y_j) / (m n).
    """
    x, y = x.to(torch.float64), y.to(torch.float64)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"MMD needs at least 2 samples on each side, got {m} and {n}")
    kxx, kyy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(within_x + within_y - 2 * polynomial_kernel(x, y).sum() / (m * n))


def kid_subsets(n_a: int, n_b: int, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0):
    """Index pairs (m,) int64 for KID: `num_subsets` draws without replacement of m = min(subset_size,
    min(n_a, n_b) // 2) rows from each side, from a torch.Generator seeded with `seed`."""
    size = min(subset_size, min(n_a, n_b) // 2)
    if size < 2:
        raise ValueError(f"KID needs at least 4 images on each side, got {n_a} and {n_b}")
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randperm(n_a, generator=generator)[:size], torch.randperm(n_b, generator=generator)[:size])
            for _ in range(num_subsets)]


def kernel_inception_distance(features_a: torch.Tensor, features_b: torch.Tensor, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (mean, std) of unbiased MMD^2 over random subsets (see `kid_subsets`) of features (n_a, D), (n_b, D).
    std is the population standard deviation over subsets, as torch-fidelity reports it."""
    a, b = features_a.to(torch.float64), features_b.to(torch.float64)
    values = torch.tensor([mmd2_unbiased(a[i], b[j])
                           for i, j in kid_subsets(len(a), len(b), num_subsets, subset_size, seed)])
    return float(values.mean()), float(values.std(correction=0))


def kth_neighbour_radii(features: torch.Tensor, k: int = 3, batch_size: int = 1000) -> torch.Tensor:
    """(n,) float64: distance from each row of features (n, D) to its k-th nearest other row."""
    features = features.to(torch.float64)
    if len(features) <= k:
        raise ValueError(f"k-th neighbour radii need more than k = {k} features, got {len(features)}")
    # each row's distance to itself is one of the k + 1 smallest (it is 0 up to rounding)
    return torch.cat([torch.cdist(chunk, features).kthvalue(k + 1, dim=1).values
                      for chunk in features.split(batch_size)])


def manifold_coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
                      batch_size: int = 1000) -> float:
    """Fraction of points (n, D) inside at least one ball |x - centres_j| <= radii_j (centres (m, D), radii (m,))."""
    points, centres = points.to(torch.float64), centres.to(torch.float64)
    inside = [(torch.cdist(chunk, centres) <= radii).any(dim=1) for chunk in points.split(batch_size)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, batch_size: int = 1000) -> tuple:
    """Improved precision and recall (Kynkaanniemi et al. 2019, arXiv:1904.06991) of fake features
    (n_f, D) against real ones (n_r, D): precision = share of fakes inside the real manifold, recall = share of
    reals inside the fake manifold; a manifold is the union of balls reaching each point's k-th neighbour."""
    precision = manifold_coverage(fake, real, kth_neighbour_radii(real, k, batch_size), batch_size)
    recall = manifold_coverage(real, fake, kth_neighbour_radii(fake, k, batch_size), batch_size)
    return precision, recall
