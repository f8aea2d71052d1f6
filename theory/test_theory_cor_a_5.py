"""Corollary A.5: minimum aggregation over K i.i.d. paths raises exceedance probabilities to the K-th power."""

import numpy as np
import pytest

from theory.gmm import image_like_gmm, random_gmm


@pytest.mark.parametrize("block,family", [("whole", "full_rank"), ("pixel", "full_rank"), ("pixel", "image_like")])
def test_cor_a_5_min_aggregation(block, family):
    """Cor A.5: P(min_k Z^(k) > tau) = P(Z > tau)^K, Z^(k) i.i.d. copies of
    Z = ||v_p(t, X_t) - (y - X0)||^2 (block="whole") or its first coordinate (block="pixel"),
    for a mixture p in d = 3 (full rank, or image-like: rank-1 components, floor 1e-6), a fixed
    anomalous y ~ q, t = 0.5, K in {2, 3, 5, 10} and tau at the 5/20/50 % levels of Z (pilot
    sample), where P(Z > tau)^K is between 0.001 and 0.95.

    Left: frequency of {min of K draws > tau} over N groups (binomial, variance P(1-P)/N at
    the claimed P). Right: p_hat^K, p_hat the single-draw frequency from an independent sample
    of n draws (delta method: variance (K p^(K-1))^2 p(1-p)/n). Independent samples, so
    SE = sqrt(sum of variances); assert |left - right| <= 5 SE.
    """
    rng = np.random.default_rng(8)
    d, t = 3, 0.5
    p = random_gmm(rng, d, 3) if family == "full_rank" else image_like_gmm(rng, d, 3, rank=1)
    q = random_gmm(rng, d, 3, shift=1.5)
    y = q.sample(1, rng)[0]

    def draw_z(n):
        x0 = rng.standard_normal((n, d))
        r2 = (p.velocity(t, (1 - t) * x0 + t * y) - (y - x0)) ** 2
        return r2.sum(1) if block == "whole" else r2[:, 0]

    taus = np.quantile(draw_z(20_000), [0.05, 0.2, 0.5])
    z1, n, N = draw_z(200_000), 200_000, 40_000
    for K in [2, 3, 5, 10]:
        zmin = draw_z(N * K).reshape(N, K).min(1)
        for tau in taus:
            ph = (z1 > tau).mean()
            left, right = (zmin > tau).mean(), ph**K
            se = np.sqrt(right * (1 - right) / N + (K * ph ** (K - 1)) ** 2 * ph * (1 - ph) / n)
            assert abs(left - right) <= 5 * se, (K, tau, left, right, se)
