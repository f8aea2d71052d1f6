"""Theorem 4.3 / Eq. (7): weighted velocity mismatch = weighted denoising error + Fisher term."""

import numpy as np
import pytest

from theory.gmm import GMM, random_gmm

N = 100_000


def mean_se(a):
    return a.mean(), a.std(ddof=1) / np.sqrt(a.size)


@pytest.mark.parametrize("t", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_thm_4_3_population_decomposition(t):
    """Thm 4.3, Eq. (7): t^2 E_q||v_p(t, X_t) - (Y - X0)||^2
                         = (t^2/(1-t)^2) D_q(t) + (1-t)^2 J(q_t || p_t),
    p, q two different mixtures in d = 4, (Y, X0) ~ q x N(0, I).

    Both sides are Monte Carlo means over the same draws, so they are correlated and their
    separate standard errors cannot be combined as if independent. We use the paired
    difference Delta_i = a_i - b_i - c_i (left summand minus the two right summands, same
    draw i); the Delta_i are i.i.d., so SE = std(Delta)/sqrt(N) is the standard error of
    mean(Delta), correlation included, and the claim says E[Delta] = 0. Assert |mean(Delta)| <= 5 SE, for the whole
    vector and, as §4.2 states the decomposition also holds coordinate-wise, per coordinate.
    v_p is E[Y - X0 | X_t] from Gaussian conditioning, independent of the score and mu_q.
    """
    rng = np.random.default_rng(2)
    p, q = random_gmm(rng, 4, 3), random_gmm(rng, 4, 2, shift=1.0)
    y, x0 = q.sample(N, rng), rng.standard_normal((N, 4))
    x = (1 - t) * x0 + t * y
    a = t**2 * (p.velocity(t, x) - (y - x0)) ** 2                         # (N, d)
    b = t**2 / (1 - t) ** 2 * (y - q.posterior_mean(t, x)) ** 2
    c = (1 - t) ** 2 * (q.score(t, x) - p.score(t, x)) ** 2
    for delta in [(a - b - c).sum(1)] + [(a - b - c)[:, i] for i in range(4)]:
        m, se = mean_se(delta)
        assert abs(m) <= 5 * se, (m, se, a.sum(1).mean())


@pytest.mark.parametrize("t", [0.05, 0.2, 0.5, 0.8, 0.95, 0.99, 0.999])
def test_thm_4_3_weighted_denoising_bound(t):
    """Thm 4.3 (second part) / App. A.7: (t^2/(1-t)^2) D_q(t) <= d uniformly on (0, 1),
    including t close to 1, for a mixture q in d = 5.

    D_q(t) = E_q||Y - mu_q(X_t)||^2 is a Monte Carlo mean; assert estimate <= d + 5 SE.
    """
    rng = np.random.default_rng(3)
    d = 5
    q = random_gmm(rng, d, 4, shift=1.0)
    y, x0 = q.sample(N, rng), rng.standard_normal((N, d))
    x = (1 - t) * x0 + t * y
    w, se = mean_se(t**2 / (1 - t) ** 2 * ((y - q.posterior_mean(t, x)) ** 2).sum(1))
    assert w <= d + 5 * se, (w, se)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9, 0.999])
def test_thm_4_3_normal_data_has_no_fisher_term(t):
    """Thm 4.3 under y ~ p: J(p_t || p_t) = 0, so t^2 E_p||v_p - (Y - X0)||^2 equals the
    weighted denoising term alone. For a Gaussian p = N(m, S) that term has the closed form
    (t^2/(1-t)^2) tr(S - t^2 S C^{-1} S) = sum_i t^2 l_i / (t^2 l_i + (1-t)^2) (< d),
    l_i the eigenvalues of S, C = t^2 S + (1-t)^2 I. Monte Carlo left side versus closed form:
    assert |MC - closed form| <= 5 SE.
    """
    rng = np.random.default_rng(4)
    d = 6
    B = rng.standard_normal((d, d))
    p = GMM([1.0], rng.standard_normal((1, d)), [B @ B.T / d + 0.1 * np.eye(d)])
    y, x0 = p.sample(N, rng), rng.standard_normal((N, d))
    x = (1 - t) * x0 + t * y
    lhs, se = mean_se(t**2 * ((p.velocity(t, x) - (y - x0)) ** 2).sum(1))
    lam = np.linalg.eigvalsh(p.covs[0])
    closed = (t**2 * lam / (t**2 * lam + (1 - t) ** 2)).sum()
    assert abs(lhs - closed) <= 5 * se, (lhs, closed, se)
    assert closed < d
