"""The laboratory itself (gmm.py): sampling, the closed-form posterior means and the score,
each against a computation that shares no code with it. Not a claim of the paper."""

import numpy as np
import torch

from theory.gmm import image_like_gmm, random_gmm
from theory.strategies import assert_equal_to_rounding


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
    functions h (here 1, X_t and sin X_t per coordinate), and likewise for E[X0 | X_t], on a
    full-rank and an image-like (rank 1 in d = 3, floor 1e-6) mixture.
    Monte Carlo over (Y ~ r, X0); assert |mean| <= 5 SE for each of the 3 d products."""
    rng = np.random.default_rng(11)
    t, n = 0.4, 200_000
    for r in (random_gmm(rng, 3, 3), image_like_gmm(rng, 3, 3, rank=1)):
        y, x0 = r.sample(n, rng), rng.standard_normal((n, 3))
        x = (1 - t) * x0 + t * y
        for resid in (y - r.posterior_mean(t, x), x0 - r.posterior_mean_x0(t, x)):
            for h in (np.ones_like(x), x, np.sin(x)):
                prod = resid * h
                assert np.all(np.abs(prod.mean(0)) <= 5 * prod.std(0, ddof=1) / np.sqrt(n))


def test_score_matches_torch_autograd():
    """The closed-form score s_{r_t} = grad log r_t equals torch autograd of the path-marginal
    log-density written independently with torch.distributions
    (sum_k pi_k N(t m_k, t^2 S_k + (1-t)^2 I)); the log-densities agree too. Full-rank and
    image-like mixtures, t up to 0.99. Exact up to float64 rounding.
    """
    rng = np.random.default_rng(0)
    laws = [(random_gmm(rng, 1, 3), 0.05), (random_gmm(rng, 2, 2), 0.5), (random_gmm(rng, 5, 4), 0.9),
            (random_gmm(rng, 8, 1), 0.3), (image_like_gmm(rng, 6, 3, rank=2), 0.9),
            (image_like_gmm(rng, 4, 2, rank=1), 0.99)]
    for r, t in laws:
        d = r.d
        x = 2.0 * rng.standard_normal((16, d))
        C = torch.tensor(t**2 * r.covs + (1 - t) ** 2 * np.eye(d))
        comps = torch.distributions.MultivariateNormal(t * torch.tensor(r.means), covariance_matrix=C)
        xt = torch.tensor(x, requires_grad=True)
        logr = torch.logsumexp(comps.log_prob(xt[:, None, :]) + torch.log(torch.tensor(r.weights)), dim=1)
        (grad,) = torch.autograd.grad(logr.sum(), xt)
        assert_equal_to_rounding(r.log_density(t, x), logr.detach().numpy())
        assert_equal_to_rounding(r.score(t, x), grad.numpy())
