"""The distribution metrics themselves, numpy only: Fréchet distance, Inception Score, precision / recall.

The pieces: streaming mean/covariance, Fréchet distance, Inception Score, and k-NN precision / recall:

- ``RunningStats``: mean and covariance of feature rows fed in batches (float64 sums around a shift taken from
  the first batch, so the mean never cancels the spread); equals ``np.mean`` / ``np.cov(rowvar=False)``.
- ``frechet_distance(mu1, s1, mu2, s2)``: ``|mu1-mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^(1/2))``. The trace
  of the matrix square root is taken as ``sum(sqrt(eig(r s2 r)))`` with ``r = s1^(1/2)`` from a symmetric
  eigendecomposition: ``r s2 r`` is symmetric positive semi-definite and similar to ``s1 s2``, so no general
  (complex) ``sqrtm`` is needed and near-singular covariances (fewer samples than dimensions, dead features)
  stay finite. Tests compare it with scipy's ``linalg.sqrtm`` on the product, the computation of the TTUR /
  ADM evaluators.
- ``InceptionScore``: ``exp(E_x KL(p(y|x) || p(y)))`` per split of ``split_size`` consecutive samples (ADM's
  evaluator: 5000), averaged over splits; fed class probabilities batch by batch.
- ``precision_recall``: Kynkäänniemi et al. 2019 as ADM's evaluator runs it: a reference (sample) feature's
  hypersphere reaches its k-th nearest neighbour (k = 3) among the reference (samples); precision = fraction
  of samples inside some reference hypersphere, recall = fraction of references inside some sample
  hypersphere.
"""

from __future__ import annotations

import numpy as np

from ditdeploy.errors import DitDeployError

__all__ = ["InceptionScore", "RunningStats", "check_gaussian", "frechet_distance", "precision_recall",
           "precision_recall_bytes"]

#: relative tolerances of a stored covariance: asymmetry max|S - S^T| and the most negative eigenvalue, both against
#: max|eigenvalue| (float32-stored covariances of 2048 features are symmetric to ~1e-7 and PSD to ~1e-6 relative)
SYMMETRY_RTOL = 1e-5
PSD_RTOL = 1e-4


class RunningStats:
    """Mean and unbiased covariance of rows added batch by batch (memory: one d x d float64 matrix)."""

    def __init__(self) -> None:
        self.n = 0
        self._shift: np.ndarray | None = None
        self._s1: np.ndarray | None = None
        self._s2: np.ndarray | None = None

    def add(self, feats: np.ndarray) -> None:
        """Add an (n, d) batch of feature rows."""
        x = np.asarray(feats, dtype=np.float64)
        if x.ndim != 2 or len(x) == 0:
            return
        if self._shift is None:
            self._shift = x.mean(axis=0)
            self._s1 = np.zeros(x.shape[1])
            self._s2 = np.zeros((x.shape[1], x.shape[1]))
        if x.shape[1] != len(self._shift):
            raise DitDeployError(f"feature width changed from {len(self._shift)} to {x.shape[1]}")
        c = x - self._shift
        self._s1 += c.sum(axis=0)
        self._s2 += c.T @ c
        self.n += len(x)

    @property
    def mu(self) -> np.ndarray:
        if self.n == 0:
            raise DitDeployError("no features were accumulated")
        return self._shift + self._s1 / self.n

    @property
    def sigma(self) -> np.ndarray:
        if self.n < 2:
            raise DitDeployError(f"a covariance needs at least 2 samples, got {self.n}")
        m = self._s1 / self.n
        return (self._s2 - self.n * np.outer(m, m)) / (self.n - 1)


def check_gaussian(mu: np.ndarray, sigma: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Read-time checks of precomputed statistics: ``mu`` a finite real vector of d values, ``sigma`` a finite real
    d x d covariance, symmetric and positive semi-definite within the tolerances above. float64 copies, or one line
    (a negative or complex covariance would give a negative or meaningless FID)."""
    for name, a, nd in (("mean", mu, 1), ("covariance", sigma, 2)):
        if a.dtype.kind not in "iuf":
            raise DitDeployError(f"{where}: the {name} is {a.dtype}, not real numbers")
        if a.ndim != nd or (nd == 2 and a.shape != (len(mu), len(mu))) or not a.size:
            raise DitDeployError(f"{where}: mean {mu.shape} and covariance {sigma.shape} are not a d-vector and a "
                                 "d x d matrix")
        if not np.isfinite(a).all():
            raise DitDeployError(f"{where}: the {name} contains NaN or Inf")
    m, s = mu.astype(np.float64), sigma.astype(np.float64)
    ev = np.linalg.eigvalsh((s + s.T) / 2)
    scale = max(float(np.abs(ev).max()), np.finfo(np.float64).tiny)
    if float(np.abs(s - s.T).max()) > SYMMETRY_RTOL * scale:
        raise DitDeployError(f"{where}: the covariance is not symmetric: not a covariance matrix")
    if float(ev.min()) < -PSD_RTOL * scale:
        raise DitDeployError(f"{where}: the covariance has a negative eigenvalue ({float(ev.min()):.3g}): not positive "
                             "semi-definite, so not a covariance matrix")
    return m, s


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2) (float64 throughout)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise DitDeployError(f"statistics do not match: mean {mu1.shape} vs {mu2.shape}, covariance {s1.shape} vs "
                             f"{s2.shape} (were they computed with the same feature extractor?)")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise DitDeployError("the feature statistics contain NaN or Inf")
    r = _psd_sqrt(s1)
    m = r @ ((s2 + s2.T) / 2) @ r
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(ev, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


class InceptionScore:
    """Inception Score over consecutive splits of ``split_size`` samples, fed class probabilities in batches."""

    def __init__(self, split_size: int = 5000) -> None:
        if split_size < 1:
            raise DitDeployError(f"split size must be >= 1, got {split_size}")
        self.split_size = split_size
        self.scores: list[float] = []
        self._part: list[np.ndarray] = []
        self._held = 0

    def add(self, probs: np.ndarray) -> None:
        """Add (n, classes) rows of p(y|x)."""
        p = np.asarray(probs, dtype=np.float64)
        while len(p):
            take = min(len(p), self.split_size - self._held)
            self._part.append(p[:take])
            self._held += take
            p = p[take:]
            if self._held == self.split_size:
                self._close()

    def _close(self) -> None:
        part = np.concatenate(self._part)
        self._part, self._held = [], 0
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        self.scores.append(float(np.exp(kl.sum(axis=1).mean())))

    def result(self) -> float:
        """Mean over splits (a last partial split counts as a split, as in ADM's evaluator)."""
        if self._held:
            self._close()
        if not self.scores:
            raise DitDeployError("no samples for the Inception Score")
        return float(np.mean(self.scores))


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances in the inputs' dtype, clipped at 0."""
    d = (a * a).sum(1)[:, None] - 2.0 * a @ b.T + (b * b).sum(1)[None, :]
    return np.maximum(d, 0.0)


def _radii(feats: np.ndarray, k: int, rows: int) -> np.ndarray:
    """Squared distance of every row to its k-th nearest other row (itself, at 0, is neighbour 0)."""
    out = np.empty(len(feats))
    kk = min(k, len(feats) - 1)
    for i in range(0, len(feats), rows):
        d = _sq_dists(feats[i : i + rows], feats)
        out[i : i + rows] = np.partition(d, kk, axis=1)[:, kk]
    return out


def _covered(points: np.ndarray, centers: np.ndarray, radii: np.ndarray, rows: int) -> np.ndarray:
    """Boolean per point: inside at least one hypersphere (center, squared radius)."""
    out = np.zeros(len(points), dtype=bool)
    for i in range(0, len(points), rows):
        out[i : i + rows] = (_sq_dists(points[i : i + rows], centers) <= radii[None, :]).any(axis=1)
    return out


def precision_recall_bytes(n_ref: int, n_samples: int, dim: int = 2048, rows: int = 1024) -> int:
    """Peak bytes :func:`precision_recall` needs: both feature sets kept in float32, plus one block of distances
    (``rows`` x the larger set) with its two temporaries."""
    return 4 * ((n_ref + n_samples) * dim + 3 * rows * max(n_ref, n_samples))


def precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = 3, rows: int = 1024) -> tuple[float, float]:
    """(precision, recall) of ``samples`` against ``ref`` feature rows (k-NN manifolds, squared distances)."""
    r = np.asarray(ref, dtype=np.float32)  # float32 like ADM's evaluator: 50K x 2048 rows stay at 400 MB
    s = np.asarray(samples, dtype=np.float32)
    if len(r) < 2 or len(s) < 2:
        raise DitDeployError("precision/recall need at least 2 reference and 2 sample features")
    r_rad, s_rad = _radii(r, k, rows), _radii(s, k, rows)
    return float(_covered(s, r, r_rad, rows).mean()), float(_covered(r, s, s_rad, rows).mean())
