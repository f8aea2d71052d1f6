"""Proposition A.3 / Eq. (13): L^2 decomposition of the endpoint residual, by Monte Carlo."""

import numpy as np
import pytest

from theory.gmm import image_like_gmm, random_gmm
from theory.strategies import mean_se

N = 100_000  # draws per independent sample

CASES = [("full_rank", t) for t in [0.1, 0.3, 0.5, 0.7, 0.9]] + [("image_like", t) for t in [0.3, 0.7]]


@pytest.mark.parametrize("family,t", CASES)
def test_prop_a_3_endpoint_decomposition(family, t):
    """Prop A.3, Eq. (13): E_q||Y - mu_p(X_t)||^2 = D_q(t) + ((1-t)^4/t^2) J(q_t || p_t),
    with D_q(t) = E_q||Y - mu_q(X_t)||^2 and J = E_{q_t}||s_{q_t} - s_{p_t}||^2, for two
    different mixtures p (normal) and q (anomalous, means shifted), d = 3: full rank, and
    image-like (components of rank 1 with eigenvalues 1e-6 elsewhere, q off p's slabs).

    The left side (mu_p by Bayes' rule), D_q (mu_q by Bayes' rule) and J (closed-form scores)
    are sample means over three independent samples of (Y ~ q, X0 ~ N(0, I)), so the standard
    error of left - right is the root-sum-square of the three standard errors; we assert
    |left - right| <= 5 SE (a 5-sigma normal event; the seed is fixed, so the run is
    deterministic). The middle form E_q||mu_q - mu_p||^2 is Eq. (6) squared: a consequence.
    """
    rng = np.random.default_rng(1)
    if family == "full_rank":
        p, q = random_gmm(rng, 3, 3), random_gmm(rng, 3, 3, shift=1.0)
    else:
        p, q = image_like_gmm(rng, 3, 3, rank=1), image_like_gmm(rng, 3, 3, rank=1, shift=1.0)
    samples = []
    for _ in range(3):
        y, x0 = q.sample(N, rng), rng.standard_normal((N, 3))
        samples.append((y, (1 - t) * x0 + t * y))
    (y1, x1), (y2, x2), (_, x3) = samples
    lhs, se_lhs = mean_se(((y1 - p.posterior_mean(t, x1)) ** 2).sum(1))
    D, se_D = mean_se(((y2 - q.posterior_mean(t, x2)) ** 2).sum(1))
    J, se_J = mean_se(((q.score(t, x3) - p.score(t, x3)) ** 2).sum(1))
    c = (1 - t) ** 4 / t**2
    se = np.sqrt(se_lhs**2 + se_D**2 + c**2 * se_J**2)
    assert abs(lhs - (D + c * J)) <= 5 * se, (lhs, D, c * J, se)
