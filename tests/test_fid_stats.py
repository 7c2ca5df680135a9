"""The metrics of ``ditdeploy.fid.stats`` against independent computations.

- Fréchet distance: scipy's ``linalg.sqrtm`` on ``sigma1 @ sigma2`` (the TTUR / ADM evaluators' computation) on
  synthetic features, incl. near-singular covariances (fewer samples than dimensions, a dead feature, eigenvalues
  down to 1e-12); and the closed form for commuting (diagonal) covariances, ``sum (sqrt a - sqrt b)^2``.
- Inception Score: hand computations (one-hot rows -> the class count, identical rows -> 1, a 3x2 case worked out
  with ``math.log``) and ADM's split rule.
- Streaming mean/covariance: ``np.mean`` / ``np.cov`` on data with a large offset, fed in uneven batches.
- Precision / recall: brute force with scipy's ``cdist`` and sorted neighbour distances.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import linalg
from scipy.spatial.distance import cdist

from ditdeploy.errors import DitDeployError
from ditdeploy.fid.stats import InceptionScore, RunningStats, frechet_distance, precision_recall


def _scipy_fid(mu1, s1, mu2, s2) -> float:
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("n,d,shift", [(400, 16, 0.0), (400, 16, 0.5), (2000, 64, 0.1)])
def test_frechet_matches_scipy_sqrtm_well_conditioned(n, d, shift):
    rng = np.random.default_rng(d)
    a = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    b = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.9 + shift
    ours, ref = frechet_distance(*_stats(a), *_stats(b)), _scipy_fid(*_stats(a), *_stats(b))
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-9)  # both float64: agreement to round-off
    assert ours > 0


def test_frechet_identical_stats_is_zero_and_symmetric():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((300, 12)), rng.standard_normal((300, 12)) * 1.3
    sa, sb = _stats(a), _stats(b)
    assert abs(frechet_distance(*sa, *sa)) < 1e-10
    assert frechet_distance(*sa, *sb) == pytest.approx(frechet_distance(*sb, *sa), rel=1e-10)


def test_frechet_closed_form_diagonal_including_zeros():
    a = np.array([4.0, 1.0, 0.0, 0.25, 0.0])
    b = np.array([1.0, 1.0, 9.0, 0.0, 0.0])  # singular on both sides
    mu1, mu2 = np.array([0, 1, 2, 3, 4.0]), np.array([0, 0, 2, 3, 6.0])
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())  # = 1 + 4 + 1 + 9 + 0.25
    assert expected == pytest.approx(15.25)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("case", ["fewer_samples_than_dims", "dead_feature", "tiny_eigenvalues"])
def test_frechet_near_singular_matches_scipy(case):
    """Rank-deficient covariances: ours stays finite and equals scipy's sqrtm result. The product's zero eigenvalues
    make sqrtm ill-conditioned (error ~ sqrt(machine eps) * scale), hence the 1e-6 relative tolerance."""
    rng = np.random.default_rng(7)
    d = 32
    if case == "fewer_samples_than_dims":
        a, b = rng.standard_normal((12, d)), rng.standard_normal((20, d)) + 0.2
    elif case == "dead_feature":
        a, b = rng.standard_normal((500, d)), rng.standard_normal((500, d)) * 1.1
        a[:, 3] = 0.7
        b[:, 3] = 0.7  # a constant (dead) unit on both sides: zero row/column in both covariances
    else:
        q = np.linalg.qr(rng.standard_normal((d, d)))[0]
        s1 = (q * np.logspace(-12, 0, d)) @ q.T
        s2 = (q * np.logspace(0, -12, d)) @ q.T * 2.0
        mu = rng.standard_normal(d)
        ours = frechet_distance(mu, s1, mu * 0.9, s2)
        assert np.isfinite(ours)
        assert ours == pytest.approx(_scipy_fid(mu, s1, mu * 0.9, s2), rel=1e-6)
        return
    sa, sb = _stats(a), _stats(b)
    ours = frechet_distance(*sa, *sb)
    assert np.isfinite(ours) and ours > 0
    assert ours == pytest.approx(_scipy_fid(*sa, *sb), rel=1e-6)


def test_frechet_rejects_mismatched_or_nonfinite():
    with pytest.raises(DitDeployError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(DitDeployError, match="NaN"):
        frechet_distance(np.array([np.nan, 0]), np.eye(2), np.zeros(2), np.eye(2))


def test_running_stats_equal_numpy_with_large_offset():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1003, 20)) * 0.5 + 1e4  # the mean dwarfs the spread: naive sums would cancel
    rs = RunningStats()
    bounds = [0, 7, 300, 301, 900, 1003]
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        rs.add(x[lo:hi])
    assert rs.n == 1003
    np.testing.assert_allclose(rs.mu, x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(rs.sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)


def test_running_stats_needs_two_samples():
    rs = RunningStats()
    rs.add(np.ones((1, 4)))
    with pytest.raises(DitDeployError, match="at least 2"):
        _ = rs.sigma


def test_inception_score_hand_computed():
    one_hot = np.eye(4)
    isc = InceptionScore()
    isc.add(one_hot)
    assert isc.result() == pytest.approx(4.0)  # KL(onehot || uniform) = log 4 for every row
    same = InceptionScore()
    same.add(np.tile([0.2, 0.3, 0.5], (6, 1)))
    assert same.result() == pytest.approx(1.0)  # p(y|x) = p(y): no information
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    m = [(0.9 + 0.2 + 0.5) / 3, (0.1 + 0.8 + 0.5) / 3]
    kl = [sum(r[j] * (math.log(r[j]) - math.log(m[j])) for j in range(2)) for r in p]
    expected = math.exp(sum(kl) / 3)
    got = InceptionScore()
    got.add(p[:2])
    got.add(p[2:])  # batches need not align with anything
    assert got.result() == pytest.approx(expected, rel=1e-12)


def test_inception_score_splits_like_adm():
    """ADM: consecutive splits of split_size, a last partial split counts, the score is the mean over splits."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5) * 0.3, size=23)
    isc = InceptionScore(split_size=10)
    for i in range(0, 23, 4):
        isc.add(p[i : i + 4])
    per = []
    for i in range(0, 23, 10):
        one = InceptionScore(split_size=100)
        one.add(p[i : i + 10])
        per.append(one.result())
    assert isc.result() == pytest.approx(np.mean(per), rel=1e-12)
    assert len(isc.scores) == 3


def _brute_pr(ref: np.ndarray, samples: np.ndarray, k: int = 3) -> tuple[float, float]:
    drr = np.sort(cdist(ref, ref), axis=1)[:, k]
    dss = np.sort(cdist(samples, samples), axis=1)[:, k]
    dsr = cdist(samples, ref)
    precision = np.mean([(dsr[i] <= drr).any() for i in range(len(samples))])
    recall = np.mean([(dsr[:, j] <= dss).any() for j in range(len(ref))])
    return float(precision), float(recall)


def test_precision_recall_brute_force():
    rng = np.random.default_rng(5)
    ref = rng.standard_normal((300, 8))
    samples = rng.standard_normal((250, 8)) * 0.6 + 0.8  # narrower and shifted: precision != recall
    p, r = precision_recall(ref, samples, rows=64)  # small row blocks: the blocking is exercised
    bp, br = _brute_pr(ref, samples)
    assert (p, r) == pytest.approx((bp, br), abs=1e-12)
    assert 0.05 < r < p < 1.0
    same_p, same_r = precision_recall(ref, ref)
    assert same_p == 1.0 and same_r == 1.0
