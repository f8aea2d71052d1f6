"""§4.3 "Endpoint behavior" and App. A.7: the two terms of Eq. (7) as t -> 1.

The paper: as t -> 1, (1-t)^2 J(q_t || p_t) vanishes (if J is bounded on (0, 1)) and the
weighted denoising term stays <= d. Checked here: (a) with full-rank laws J(q_t || p_t)
tends to the finite J(q || p), so (1-t)^2 J -> 0 at rate (1-t)^2; (b) when p is (nearly)
degenerate, as image laws are, and q puts mass off its support, J is unbounded and
(1-t)^2 J grows like dist^2/(1-t)^2 until 1-t reaches the smallest standard deviation of p;
(c) the weighted denoising term of normal data counts the directions of p whose variance
exceeds the noise level (1-t)^2: it reaches d only for full-rank laws (README, finding 5).
"""

import numpy as np
import pytest

from theory.gmm import GMM, gaussian_fisher, gaussian_weighted_denoising, image_like_gmm, low_rank_covs, random_gmm
from theory.strategies import mean_se

N = 50_000


def fisher_mc(p, q, t, rng, n=N):
    """Monte Carlo J(q_t || p_t) = E||s_q - s_p||^2 over X_t = (1-t) X0 + t Y, Y ~ q, with the
    mixture scores of gmm.py: returns (mean, SE)."""
    y, x0 = q.sample(n, rng), rng.standard_normal((n, q.d))
    x = (1 - t) * x0 + t * y
    return mean_se(((q.score(t, x) - p.score(t, x)) ** 2).sum(1))


def test_sec_4_3_fisher_term_vanishes_when_j_is_bounded():
    """§4.3: (1-t)^2 J(q_t || p_t) -> 0 as t -> 1 when J is bounded. Full-rank Gaussians in
    d = 6: p = N(0, S) (eigenvalues 0.21 ... 1.76), q = N(0.5 * 1, I).
    Check: Monte Carlo J (mixture scores) against gaussian_fisher (Gaussian Fisher formula) at
    t = 0.9, 0.99, 0.999; assert |MC - closed| <= 5 SE.
    Consequence of the closed form (labelled, not a check): J(q_t || p_t) tends to the endpoint
    J(q || p) (the same formula with C = S, t = 1), within 1 % at t >= 0.999, so (1-t)^2 J
    falls by 100x per decade of 1 - t.
    """
    d = 6
    S = low_rank_covs(np.random.default_rng(12), 1, d, d)[0]
    p, q = GMM([1.0], np.zeros((1, d)), [S]), GMM([1.0], np.full((1, d), 0.5), [np.eye(d)])
    rng = np.random.default_rng(15)
    for t in [0.9, 0.99, 0.999]:
        mc, se = fisher_mc(p, q, t, rng)
        closed = gaussian_fisher(q.means[0], q.covs[0], p.means[0], S, t)
        assert abs(mc - closed) <= 5 * se, (t, mc, closed, se)
    J1 = gaussian_fisher(q.means[0], q.covs[0], p.means[0], S, 1.0)
    for t in [0.999, 0.9999, 0.99999]:
        assert abs(gaussian_fisher(q.means[0], q.covs[0], p.means[0], S, t) / J1 - 1) < 0.01


@pytest.mark.parametrize("eps", [1e-4, 1e-12])
def test_sec_4_3_fisher_term_when_p_is_nearly_degenerate(eps):
    """§4.3 when its assumption fails: p = N(0, eps) in 1-D (a pixel whose normal value is
    nearly fixed), q = N(1, 1). Then J(q_t || p_t) ~ E_q[Y^2] / (t^2 eps + (1-t)^2)^2 is not
    bounded on (0, 1) as eps -> 0.
    Check: Monte Carlo (1-t)^2 J (mixture scores) against (1-t)^2 gaussian_fisher at
    t = 0.9, 0.99, 0.999; assert |MC - closed| <= 5 SE.
    Consequences of the closed form (labelled): for eps = 1e-4 the term peaks near
    1 - t = sqrt(eps) at about E_q[Y^2]/(4 eps) = 5000 (158, 4999, 196 at t = 0.9, 0.99,
    0.999); for eps = 1e-12 it grows like 2/(1-t)^2, 100x per decade of 1 - t.
    """
    p, q = GMM([1.0], [[0.0]], [[[eps]]]), GMM([1.0], [[1.0]], [[[1.0]]])
    rng = np.random.default_rng(16)
    ts = [0.9, 0.99, 0.999]
    closed = [(1 - t) ** 2 * gaussian_fisher([1.0], [[1.0]], [0.0], [[eps]], t) for t in ts]
    for t, c in zip(ts, closed):
        mc, se = fisher_mc(p, q, t, rng)
        assert abs((1 - t) ** 2 * mc - c) <= 5 * (1 - t) ** 2 * se, (t, (1 - t) ** 2 * mc, c)
    if eps == 1e-4:
        assert abs(closed[1] / (2 / (4 * eps)) - 1) < 0.01 and closed[0] < 200 and closed[2] < 200
    else:
        assert closed[1] > 90 * closed[0] and closed[2] > 90 * closed[1]


@pytest.mark.parametrize("family", ["full_rank", "image_like"])
def test_sec_4_3_weighted_denoising_counts_directions_above_noise(family):
    """README finding 5 (restated): under normal data, t^2 E_p||v_p - (Y - X0)||^2 = (t^2/(1-t)^2) D_p(t)
    lies between  sum_k pi_k sum_i t^2 l_ki / (t^2 l_ki + (1-t)^2)  (the Bayes risk when the
    component k of Y is also known, which can only be lower; l_ki the eigenvalues of S_k)
    and d (Thm 4.3). The lower end counts the directions with variance above (1-t)^2: about d
    for a full-rank mixture, about the rank (2) for an image-like one (3 components of rank 2,
    floor 1e-6, d = 6) until 1 - t < 1e-3.
    Check: Monte Carlo with v_p by conditioning, against the bracket computed from the
    eigenvalues; assert lower - 5 SE <= MC <= d + 5 SE at t = 0.9, 0.99, 0.999.
    Consequence (labelled): for the image-like p an anomalous q (full rank, shifted) scores
    more than 100 times the normal value at these t, the opposite of "alike".
    """
    rng = np.random.default_rng(14)
    d = 6
    p = random_gmm(rng, d, 3) if family == "full_rank" else image_like_gmm(rng, d, 3, rank=2)
    q = random_gmm(rng, d, 2, shift=1.0)
    for t in [0.9, 0.99, 0.999]:
        lower = sum(w * gaussian_weighted_denoising(S, t) for w, S in zip(p.weights, p.covs))
        terms = []
        for r in (p, q):
            y, x0 = r.sample(N, rng), rng.standard_normal((N, d))
            x = (1 - t) * x0 + t * y
            terms.append(mean_se(t**2 * ((p.velocity(t, x) - (y - x0)) ** 2).sum(1)))
        (normal, se), (anomalous, _) = terms
        assert lower - 5 * se <= normal <= d + 5 * se, (t, lower, normal, se)
        if family == "image_like":
            assert anomalous > 100 * normal
