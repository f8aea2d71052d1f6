"""One pixel of the mismatch with a Gaussian normal law: the exact law of the path average.

For a 1-D normal law p = N(m_p, s^2) the oracle velocity v_p(t, x) is affine in x, so for a
fixed y the mismatch is Z = (v_p(t, X_t) - (y - X0))^2 = (a X0 + b)^2 with X0 ~ N(0, 1).
The mean of K i.i.d. copies is then (a^2 / K) times a noncentral chi-square with K degrees of
freedom and noncentrality K b^2 / a^2, so the tail P(|m_hat - m| >= e) of Lemma A.4 is exact
(scipy.stats.ncx2), with m = E Z = a^2 + b^2. The sub-exponential norm
nu = ||Z - m||_psi1 = inf{s : E exp(|Z - m|/s) <= 2} is computed separately, by quadrature over
X0 and root-finding, so the bound and the tail it bounds share nothing but the law.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import brentq
from scipy.special import logsumexp
from scipy.stats import ncx2

from theory.gmm import GMM

NODES = np.linspace(-40.0, 40.0, 160_001)
LOG_W = np.log(NODES[1] - NODES[0]) - 0.5 * NODES**2 - 0.5 * np.log(2 * np.pi)  # trapezoid x N(0,1)
LOG_W[[0, -1]] += np.log(0.5)


class PixelLaw:
    """Z = (v_p(t, X_t) - (y - X0))^2 for p = N(0, s2) in 1-D, a fixed y and time t."""

    def __init__(self, t: float, y: float, s2: float):
        self.t, self.y, self.p = t, y, GMM([1.0], [[0.0]], [[[s2]]])
        r0, r1 = self.residual(np.array([0.0, 1.0]))
        self.a, self.b = r1 - r0, r0                                 # residual = a X0 + b
        self.m = self.a**2 + self.b**2

    def residual(self, x0: np.ndarray) -> np.ndarray:
        """v_p(t, x_t) - (y - x0) with x_t = (1-t) x0 + t y, from GMM conditioning; any shape."""
        t, y = self.t, self.y
        x = ((1 - t) * x0 + t * y).reshape(-1, 1)
        return (self.p.velocity(t, x)[:, 0] - (y - x0.ravel())).reshape(x0.shape)

    def sample(self, shape, rng: np.random.Generator) -> np.ndarray:
        return self.residual(rng.standard_normal(shape)) ** 2

    def psi1(self) -> float:
        """nu = ||Z - m||_psi1 by quadrature (trapezoid, 160001 nodes on [-40, 40]) and brentq."""
        absx = np.abs(self.residual(NODES) ** 2 - self.m)
        sd = np.sqrt(np.exp(LOG_W) @ absx**2)
        nu = brentq(lambda s: logsumexp(absx / s + LOG_W) - np.log(2), sd / 20, 100 * sd,
                    xtol=1e-12, rtol=1e-14)
        assert (absx / nu + LOG_W)[[0, -1]].max() < np.log(2) - 100      # grid wide enough
        return nu

    def tail(self, K: int, e) -> np.ndarray:
        """P(|m_hat - m| >= e) exactly, m_hat the mean of K i.i.d. copies of Z."""
        e = np.asarray(e, dtype=np.float64)
        scale, nc = self.a**2 / K, K * self.b**2 / self.a**2
        lower = np.where(self.m - e > 0, ncx2.cdf(np.maximum(self.m - e, 0) / scale, K, nc), 0.0)
        return ncx2.sf((self.m + e) / scale, K, nc) + lower
