"""The laboratory itself: mixture sampling and the closed-form posterior against Monte Carlo."""

import numpy as np

from theory.gmm import random_gmm


def test_gmm_sampling_moments():
    """GMM.sample draws from sum_k pi_k N(m_k, S_k): the sample mean matches sum_k pi_k m_k per
    coordinate within 5 SE (SE from the closed-form mixture covariance)."""
    rng = np.random.default_rng(10)
    r = random_gmm(rng, 4, 3)
    n = 200_000
    mean = r.weights @ r.means
    cov = np.einsum("k,kij->ij", r.weights, r.covs + np.einsum("ki,kj->kij", r.means, r.means)) - np.outer(mean, mean)
    y = r.sample(n, rng)
    assert np.all(np.abs(y.mean(0) - mean) <= 5 * np.sqrt(np.diag(cov) / n))


def test_gmm_posterior_mean_is_a_conditional_expectation():
    """mu_r(x) = E[Y | X_t = x] by its defining property: E[(Y - mu_r(X_t)) h(X_t)] = 0 for test
    functions h (here 1, X_t and sin X_t per coordinate), and likewise for E[X0 | X_t].
    Monte Carlo over (Y ~ r, X0); assert |mean| <= 5 SE for each of the 3 d products."""
    rng = np.random.default_rng(11)
    r, t, n = random_gmm(rng, 3, 3), 0.4, 200_000
    y, x0 = r.sample(n, rng), rng.standard_normal((n, 3))
    x = (1 - t) * x0 + t * y
    for resid in (y - r.posterior_mean(t, x), x0 - r.posterior_mean_x0(t, x)):
        for h in (np.ones_like(x), x, np.sin(x)):
            prod = resid * h
            assert np.all(np.abs(prod.mean(0)) <= 5 * prod.std(0, ddof=1) / np.sqrt(n))
