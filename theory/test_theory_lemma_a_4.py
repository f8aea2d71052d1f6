"""Lemma A.4 (Bernstein concentration of the K-path mean) and Corollary A.6 (uniform control).

The constant c of Lemma A.4 is left "universal" in the paper. We use an explicit version.
If ||X||_psi1 <= nu (E exp(|X|/nu) <= 2) then expanding the exponential gives
E|X|^k <= k! nu^k for k >= 1, i.e. Bernstein's moment condition E|X|^k <= (k!/2) s2 b^(k-2)
with s2 = 2 nu^2 and b = nu. For mean-zero X this gives E exp(l X) <= exp(l^2 s2 / (2 (1 - b|l|)))
for |l| < 1/b, and the Chernoff bound with l = e/(s2 + b e) gives, for the mean of K i.i.d. copies,
    P(|mean - m| >= e) <= 2 exp(-K e^2 / (2 (2 nu^2 + nu e)))            (Bernstein, explicit)
                       <= 2 exp(-(K/6) min(e^2/nu^2, e/nu))               (Lemma A.4 with c = 1/6),
the second step because 2 nu^2 + nu e <= 3 nu max(nu, e).

The law is a real mismatch law: Z = (v_p(t, X_t) - (y - X0))^2 for a 1-D two-component normal
law p and a fixed y (one pixel). Z is a function of the scalar X0 ~ N(0, 1), so m = E Z and
nu = ||Z - m||_psi1 = inf{s : E exp(|Z - m|/s) <= 2} are computed by quadrature (trapezoid
rule on [-40, 40], 160001 nodes; the integrand at the ends is checked to be below e^-100
of the total) and root-finding (brentq), not estimated from a sample.
"""

import itertools

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.special import factorial, logsumexp

from theory.gmm import GMM

P = GMM([0.6, 0.4], [[-1.5], [2.0]], [[[0.3]], [[0.5]]])  # 1-D normal law of one pixel
NODES = np.linspace(-40.0, 40.0, 160_001)
LOG_W = np.log(NODES[1] - NODES[0]) - 0.5 * NODES**2 - 0.5 * np.log(2 * np.pi)  # trapezoid x N(0,1)
LOG_W[[0, -1]] += np.log(0.5)
C = 1 / 6  # explicit constant for Lemma A.4 (module docstring)


def mismatch(t, y, x0):
    """Z = (v_p(t, x_t) - (y - x0))^2 with x_t = (1-t) x0 + t y; x0 of any shape."""
    x = ((1 - t) * x0 + t * y).reshape(-1, 1)
    return ((P.velocity(t, x)[:, 0] - (y - x0.ravel())) ** 2).reshape(x0.shape)


def mean_and_psi1(t, y):
    """m = E Z and nu = ||Z - m||_psi1, by quadrature over X0 ~ N(0, 1)."""
    z = mismatch(t, y, NODES)
    m = np.exp(LOG_W) @ z
    absx = np.abs(z - m)
    log_mgf = lambda s: logsumexp(absx / s + LOG_W)                      # log E exp(|X|/s)
    sd = np.sqrt(np.exp(LOG_W) @ absx**2)
    nu = brentq(lambda s: log_mgf(s) - np.log(2), sd / 20, 100 * sd, xtol=1e-12, rtol=1e-14)
    assert (absx / nu + LOG_W)[[0, -1]].max() < np.log(2) - 100           # grid wide enough
    return m, nu, z - m


CASES = list(itertools.product([0.3, 0.7], [-1.5, 4.0]))  # (t, y): y normal, y anomalous


@pytest.mark.parametrize("t,y", CASES)
def test_lemma_a_4_bernstein_premises(t, y):
    """The two steps of the explicit Bernstein bound used for Lemma A.4, by quadrature:
    E|X|^k <= k! nu^k (k = 1..12) and E exp(l X) <= exp(l^2 nu^2 / (1 - nu |l|)) for
    |l| nu in {0.05, ..., 0.95}, X = Z - m. Tolerance: quadrature error, stated as a relative
    1e-8 (m and nu change by < 3e-9 relative on a 6x finer, 1.5x wider grid).
    """
    _, nu, X = mean_and_psi1(t, y)
    w = np.exp(LOG_W)
    k = np.arange(1, 13)
    moments = np.array([w @ np.abs(X) ** j for j in k])
    assert np.all(moments <= factorial(k) * nu**k * (1 + 1e-8))
    for lam in np.concatenate([-np.linspace(0.05, 0.95, 19), np.linspace(0.05, 0.95, 19)]) / nu:
        assert w @ np.exp(lam * X) <= np.exp(lam**2 * nu**2 / (1 - nu * abs(lam))) * (1 + 1e-8)


@pytest.mark.parametrize("t,y", CASES)
def test_lemma_a_4_path_average_tail(t, y):
    """Lemma A.4: P(|m_hat - m| >= e) <= 2 exp(-c K min(e^2/nu^2, e/nu)), c = 1/6, and the
    sharper explicit Bernstein form 2 exp(-K e^2 / (2 (2 nu^2 + nu e))) it is derived from.
    m_hat is the mean of K i.i.d. mismatches Z^(k) (K = 1, 4, 16, 64), e/nu in
    {0.05, ..., 2}; the tail frequency is over R = 20000 independent replicates. It is a
    binomial proportion, so we assert freq <= bound + 5 sqrt(bound (1 - bound) / R).
    """
    m, nu, _ = mean_and_psi1(t, y)
    rng = np.random.default_rng(6)
    R = 20_000
    for K in [1, 4, 16, 64]:
        dev = np.abs(mismatch(t, y, rng.standard_normal((R, K))).mean(1) - m)
        for e in np.array([0.05, 0.1, 0.25, 0.5, 1.0, 2.0]):
            freq = (dev >= e * nu).mean()
            bernstein = min(1.0, 2 * np.exp(-K * e**2 / (2 * (2 + e))))
            lemma = min(1.0, 2 * np.exp(-C * K * min(e**2, e)))
            assert bernstein <= lemma
            assert freq <= bernstein + 5 * np.sqrt(bernstein * (1 - bernstein) / R), (K, e, freq, bernstein)


def test_cor_a_6_uniform_control():
    """Cor A.6: with a common nu >= ||Z_t(p) - m_{t,p}||_psi1 over M = |T||Omega| pairs,
        P(max_{t,p} |m_hat_{t,p} - m_{t,p}| <= C nu max(sqrt(L/K), L/K)) >= 1 - delta,
    L = log(2M/delta), with the explicit C = 1/c = 6 that Lemma A.4 with c = 1/6 gives.
    Setting: an 8-pixel 1-D "image" y (pixels i.i.d. under the product normal law), T = 3
    times, M = 24, delta = 0.1, nu = max of the 24 quadrature psi1 norms. The failure frequency
    over R replicates is a binomial proportion: assert freq <= delta + 5 sqrt(delta (1-delta) / R).
    """
    rng = np.random.default_rng(7)
    laws = {(t, y): mean_and_psi1(t, y)[:2] for t in [0.25, 0.5, 0.75] for y in np.linspace(-3, 4, 8)}
    nu, M, delta = max(v[1] for v in laws.values()), len(laws), 0.1
    L = np.log(2 * M / delta)
    for K, R in [(20, 400), (200, 200), (2000, 50)]:
        worst = np.zeros(R)
        for (t, y), (m, _) in laws.items():
            worst = np.maximum(worst, np.abs(mismatch(t, y, rng.standard_normal((R, K))).mean(1) - m))
        eps = (1 / C) * nu * max(np.sqrt(L / K), L / K)
        freq = (worst > eps).mean()
        assert freq <= delta + 5 * np.sqrt(delta * (1 - delta) / R), (K, freq, worst.max() / eps)
