"""Proposition A.3 / Eq. (13): L^2 decomposition of the endpoint residual, by Monte Carlo."""

import numpy as np
import pytest

from theory.gmm import random_gmm
from theory.strategies import assert_equal_to_rounding

N = 100_000  # draws per independent sample


def mean_se(a):
    return a.mean(), a.std(ddof=1) / np.sqrt(a.size)


@pytest.mark.parametrize("t", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_prop_a_3_endpoint_decomposition(t):
    """Prop A.3, Eq. (13): E_q||Y - mu_p(X_t)||^2 = D_q(t) + E_q||mu_q - mu_p||^2
                                                = D_q(t) + ((1-t)^4/t^2) J(q_t || p_t),
    with D_q(t) = E_q||Y - mu_q(X_t)||^2 and J = E_{q_t}||s_{q_t} - s_{p_t}||^2, for two
    different mixtures p (normal) and q (anomalous, means shifted), d = 3.

    The left side, D_q and J are sample means over three independent samples of
    (Y ~ q, X0 ~ N(0, I)), so the standard error of left - right is the root-sum-square of the
    three standard errors; we assert |left - right| <= 5 SE (a 5-sigma normal event; the seed is
    fixed, so the run is deterministic). The middle equality (Tweedie inside the expectation)
    is pathwise and checked to float64 rounding on the third sample.
    """
    rng = np.random.default_rng(1)
    p, q = random_gmm(rng, 3, 3), random_gmm(rng, 3, 3, shift=1.0)
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
    gap2 = ((q.posterior_mean(t, x3) - p.posterior_mean(t, x3)) ** 2).sum(1)
    assert_equal_to_rounding(gap2, c * ((q.score(t, x3) - p.score(t, x3)) ** 2).sum(1))
