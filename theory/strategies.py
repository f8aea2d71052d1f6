"""Shared pieces of the theory checks: the hypothesis settings, the drawn laws, the tolerances.

Every test module imports what it needs from here, so each one runs on its own
(`python -m pytest theory/test_theory_prop_4_1.py`) and imports on its own
(`python -c "import theory.test_theory_prop_4_1"`).

Two families of laws are drawn for the exact claims:

- `mixtures`: dimension 1-8, 1-4 components, means in [-3, 3]^d, covariances B B^T + j I
  (B entries in [-1.5, 1.5], j in [0.05, 1]), weights bounded away from 0. Full rank.
- `image_like_mixtures`: the same, but each covariance is U diag(l) U^T with a random rotation
  U, a random rank r in 0..d, r eigenvalues in [0.1, 4] and the other d - r in [1e-6, 1e-3]
  (log-uniform). Images lie near low-dimensional sets; these mixtures of nearly low-rank
  components are their Gaussian stand-in.

A `scene` is two laws p, q of one family, a time t in [0.02, 0.98], and arbitrary points
x0, y in [-5, 5]^d: the exact claims hold for every x0 and y, not only for typical ones.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from theory.gmm import GMM

# derandomize=True draws the same examples on every run, so CI cannot flake. A settings object
# (not a registered profile) keeps hypothesis tests in other folders on their own settings.
THEORY = settings(derandomize=True, max_examples=40, deadline=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow])

# Exact identities are compared up to float64 rounding. Every formula goes through a solve with
# C = t^2 S + (1-t)^2 I, whose eigenvalues lie in [(1-t)^2, t^2 l_max + (1-t)^2]: with
# t <= 0.98 and l_max <= 145 (full rank: ||B||_F^2 + 1 with d = 8) or <= 4 (image-like), the
# condition number is at most kappa = 3.7e5, whatever the smallest eigenvalue of S (1e-6 in the
# image-like family does not enter: the noise (1-t)^2 I floors C). The relative error of a
# solve is about kappa * 2.2e-16 = 8e-11; a handful of further operations (responsibilities,
# one division by t or 1-t, which scales both sides alike) keep it below 1e-9 relative to the
# largest entry compared. The tolerance 1e-8 leaves a factor 10; the largest error observed is
# printed by `python -m theory.numbers`. Every formula error the tests are meant to catch moves
# the result by O(1) relative.
ROUNDING_RTOL = 1e-8


def assert_equal_to_rounding(a, b):
    """|a - b| <= ROUNDING_RTOL * (1 + max |a|, |b|), elementwise with a common scale."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = 1.0 + max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0))
    err = np.abs(a - b).max(initial=0.0)
    assert err <= ROUNDING_RTOL * scale, f"max |a - b| = {err:.3e} > {ROUNDING_RTOL:.0e} * {scale:.3g}"


def mean_se(a):
    """Sample mean and its standard error std / sqrt(n) (i.i.d. draws)."""
    a = np.asarray(a)
    return a.mean(), a.std(ddof=1) / np.sqrt(a.size)


def quantile(a, level, axis=None):
    """Q_a(W) = inf{w : P(W <= w) >= a} of the empirical law (levels above 1 clip to 1)."""
    return np.quantile(a, np.minimum(level, 1.0), axis=axis, method="inverted_cdf")


def _floats(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


@st.composite
def mixtures(draw, max_d: int = 8, max_k: int = 4, d: int | None = None):
    d = draw(st.integers(1, max_d)) if d is None else d
    k = draw(st.integers(1, max_k))
    means = draw(arrays(np.float64, (k, d), elements=_floats(-3, 3)))
    B = draw(arrays(np.float64, (k, d, d), elements=_floats(-1.5, 1.5)))
    jitter = draw(arrays(np.float64, (k,), elements=_floats(0.05, 1.0)))
    w = draw(arrays(np.float64, (k,), elements=_floats(0.05, 1.0)))
    covs = B @ B.transpose(0, 2, 1) + jitter[:, None, None] * np.eye(d)
    return GMM(w / w.sum(), means, covs)


@st.composite
def image_like_mixtures(draw, max_d: int = 8, max_k: int = 4, d: int | None = None):
    d = draw(st.integers(1, max_d)) if d is None else d
    k = draw(st.integers(1, max_k))
    means = draw(arrays(np.float64, (k, d), elements=_floats(-3, 3)))
    A = draw(arrays(np.float64, (k, d, d), elements=_floats(-1, 1)))
    ranks = draw(arrays(np.int64, (k,), elements=st.integers(0, d)))
    big = draw(arrays(np.float64, (k, d), elements=_floats(np.log(0.1), np.log(4.0))))
    small = draw(arrays(np.float64, (k, d), elements=_floats(np.log(1e-6), np.log(1e-3))))
    w = draw(arrays(np.float64, (k,), elements=_floats(0.05, 1.0)))
    covs = np.empty((k, d, d))
    for j in range(k):
        U, _ = np.linalg.qr(A[j])                      # orthogonal for any A (Householder)
        lam = np.where(np.arange(d) < ranks[j], np.exp(big[j]), np.exp(small[j]))
        covs[j] = (U * lam) @ U.T
    return GMM(w / w.sum(), means, (covs + covs.transpose(0, 2, 1)) / 2)


times = _floats(0.02, 0.98)
FAMILIES = {"full_rank": mixtures, "image_like": image_like_mixtures}


@st.composite
def scenes(draw, family: str = "full_rank", n: int = 6):
    """(p, q, t, x0, y): two laws of one family and dimension, a time, n arbitrary (x0, y)."""
    p = draw(FAMILIES[family]())
    q = draw(FAMILIES[family](d=p.d))
    t = draw(times)
    x0 = draw(arrays(np.float64, (n, p.d), elements=_floats(-5, 5)))
    y = draw(arrays(np.float64, (n, p.d), elements=_floats(-5, 5)))
    return p, q, t, x0, y
