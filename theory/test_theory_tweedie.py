"""Lemma 4.2 (Tweedie) and Eq. (6): posterior mean versus score of the path marginal."""

import numpy as np
import torch
from hypothesis import given, settings

from theory.gmm import random_gmm
from theory.strategies import assert_equal_to_rounding, scenes


@settings(settings.get_profile("theory"))
@given(scenes())
def test_lemma_4_2_tweedie(scene):
    """Lemma 4.2: mu_r(x) = x/t + ((1-t)^2/t) s_{r_t}(x), for r in {p, q} and any x.

    Left: E[Y | X_t = x] from the mixture posterior (responsibilities times each component's
    Gaussian conditional mean m_k + t S_k C_k^{-1}(x - t m_k)); right: the closed-form score of
    r_t. Exact identity; float64 rounding tolerance (strategies.ROUNDING_RTOL).
    """
    p, q, t, x0, y = scene
    x = (1 - t) * x0 + t * y
    for r in (p, q):
        assert_equal_to_rounding(r.posterior_mean(t, x), x / t + (1 - t) ** 2 / t * r.score(t, x))


@settings(settings.get_profile("theory"))
@given(scenes())
def test_eq_6_posterior_mean_gap(scene):
    """Eq. (6): mu_q(x) - mu_p(x) = ((1-t)^2/t) (s_{q_t}(x) - s_{p_t}(x)) for two mixtures p != q.

    Left from the two mixture posteriors, right from the two closed-form scores. Exact;
    float64 rounding tolerance.
    """
    p, q, t, x0, y = scene
    x = (1 - t) * x0 + t * y
    assert_equal_to_rounding(q.posterior_mean(t, x) - p.posterior_mean(t, x),
                             (1 - t) ** 2 / t * (q.score(t, x) - p.score(t, x)))


def test_score_matches_torch_autograd():
    """Cross-check of the laboratory: the closed-form score s_{r_t} = grad log r_t equals torch
    autograd of the path-marginal log-density written independently with
    torch.distributions (sum_k pi_k N(t m_k, t^2 S_k + (1-t)^2 I)); the log-densities agree too.
    Exact up to float64 rounding.
    """
    rng = np.random.default_rng(0)
    for d, k, t in [(1, 3, 0.05), (2, 2, 0.5), (5, 4, 0.9), (8, 1, 0.3)]:
        r = random_gmm(rng, d, k)
        x = 2.0 * rng.standard_normal((16, d))
        C = torch.tensor(t**2 * r.covs + (1 - t) ** 2 * np.eye(d))
        comps = torch.distributions.MultivariateNormal(t * torch.tensor(r.means), covariance_matrix=C)
        xt = torch.tensor(x, requires_grad=True)
        logr = torch.logsumexp(comps.log_prob(xt[:, None, :]) + torch.log(torch.tensor(r.weights)), dim=1)
        (grad,) = torch.autograd.grad(logr.sum(), xt)
        assert_equal_to_rounding(r.log_density(t, x), logr.detach().numpy())
        assert_equal_to_rounding(r.score(t, x), grad.numpy())
