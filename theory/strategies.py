"""Hypothesis strategies for the exact (non-statistical) theory checks, and their tolerance.

A drawn `scene` is a Gaussian mixture (dimension 1-8, 1-4 components, means in [-3, 3]^d,
covariances B B^T + j I with B entries in [-1.5, 1.5] and j in [0.05, 1], weights bounded
away from 0), a time t in [0.02, 0.98], and arbitrary points x0, y in [-5, 5]^d: the exact
claims hold for every x0 and y, not only for typical ones.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from theory.gmm import GMM

# Exact identities are compared up to float64 rounding. The computations chain a Cholesky
# solve (condition number of t^2 S + (1-t)^2 I below ~3e3 for the drawn covariances) and
# divisions by t and 1 - t (>= 0.02), so the relative rounding error is bounded by about
# 3e3 * 50^2 * 1e1 * eps ~ 2e-8 in the worst case; observed errors are below 1e-12. Every
# formula error the tests are meant to catch moves the result by O(1) relative.
ROUNDING_RTOL = 1e-8


def assert_equal_to_rounding(a, b):
    """|a - b| <= ROUNDING_RTOL * (1 + max |a|, |b|), elementwise with a common scale."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = 1.0 + max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0))
    err = np.abs(a - b).max(initial=0.0)
    assert err <= ROUNDING_RTOL * scale, f"max |a - b| = {err:.3e} > {ROUNDING_RTOL:.0e} * {scale:.3g}"


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


times = _floats(0.02, 0.98)


@st.composite
def scenes(draw, n: int = 6):
    """(p, q, t, x0, y): two mixtures of the same dimension, a time, and n arbitrary (x0, y)."""
    p = draw(mixtures())
    q = draw(mixtures(d=p.d))
    t = draw(times)
    x0 = draw(arrays(np.float64, (n, p.d), elements=_floats(-5, 5)))
    y = draw(arrays(np.float64, (n, p.d), elements=_floats(-5, 5)))
    return p, q, t, x0, y
