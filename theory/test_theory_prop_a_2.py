"""Proposition A.2 / Eq. (11): the learned-field quantile lower bound, seed-wise for a fixed y.

Eq. (12) (square both sides of (11), both non-negative) and Eq. (9) (rescale E to U, square,
average over Y) are consequences of (11); (9) is kept as a labelled consequence because it is
the main-text form. Eq. (8) is Eq. (10) (test_theory_lemma_4_2_tweedie.py) under a positive
scaling, which commutes with quantiles; it is not tested separately.

Quantiles are Q_a(W) = inf{w : P(W <= w) >= a} (numpy method="inverted_cdf"), over X0 for a
fixed test endpoint y.
"""

import itertools

import numpy as np
import pytest

from theory.gmm import conditional_score, image_like_gmm, random_gmm
from theory.strategies import ROUNDING_RTOL, quantile

N_Y, N_X0, DELTA = 8, 20_000, 1e-6
ALPHAS, BETAS = [0.05, 0.1, 0.25, 0.5], [0.05, 0.1, 0.25, 0.4]


def dkw_margin(n, n_laws, delta=DELTA):
    """DKW (Massart's constant): P(sup_w |F_n(w) - F(w)| > e) <= 2 exp(-2 n e^2). With
    e = sqrt(log(2 n_laws / delta) / (2n)) the bands of all n_laws empirical laws hold together
    with probability >= 1 - delta, and then Q_{a-e}^emp <= Q_a <= Q_{a+e}^emp for every a."""
    return np.sqrt(np.log(2 * n_laws / delta) / (2 * n))


def bridge_draws(t, eta, field="smooth", seed=5, d=3, family="full_rank"):
    """For N_Y endpoints y ~ q: L = ||v_theta - (y - X0)||, E = ||v_theta - v_p||, G = score gap,
    each (N_Y, N_X0). The error field err = v_theta - v_p is deterministic in x:
      "smooth":      eta sin(x W + b);
      "adversarial": -eta (1.5 + sin(x w + b)) r(x)/||r(x)||, r(x) = v_p(t, x) - (y - x0(x)) the
                     oracle residual (x0(x) = (x - t y)/(1-t) for this y). It points against
                     the residual, so the triangle inequality behind (11) is an equality
                     (L = |(1-t)/t G - E|) and the bound is as tight as it can be.
    family "image_like": p is a mixture of nearly rank-1 components (eigenvalues 1e-6).
    """
    rng = np.random.default_rng(seed)
    if family == "full_rank":
        p, q = random_gmm(rng, d, 3), random_gmm(rng, d, 3, shift=1.5)
    else:  # p: 3 components of rank 1 (floor 1e-6); q: full rank, off p's thin slabs
        p, q = image_like_gmm(rng, d, 3, rank=1), random_gmm(rng, d, 3, shift=1.5)
    W, b = rng.standard_normal((d, d)), rng.uniform(0, 2 * np.pi, d)
    L, E, G = (np.empty((N_Y, N_X0)) for _ in range(3))
    for i, y in enumerate(q.sample(N_Y, rng)):
        x0 = rng.standard_normal((N_X0, d))
        x = (1 - t) * x0 + t * y
        resid = p.velocity(t, x) - (y - x0)
        if field == "smooth":
            err = eta * np.sin(x @ W + b)
        else:
            unit = resid / np.linalg.norm(resid, axis=1, keepdims=True)
            err = -eta * (1.5 + np.sin(x @ W[0] + b[0]))[:, None] * unit
        L[i] = np.linalg.norm(resid + err, axis=1)
        E[i] = np.linalg.norm(err, axis=1)
        G[i] = np.linalg.norm(conditional_score(t, x, y) - p.score(t, x), axis=1)
    return L, E, G


FIELDS = [(0.0, "smooth"), (0.3, "smooth"), (1.0, "smooth"), (0.3, "adversarial"), (1.0, "adversarial")]


CASES = ([("full_rank", t) + f for t in [0.2, 0.5, 0.8] for f in FIELDS]
         + [("image_like", t) + f for t in [0.5, 0.8] for f in [(0.3, "adversarial"), (1.0, "smooth")]])


@pytest.mark.parametrize("family,t,eta,field", CASES)
def test_prop_a_2_learned_field_quantile_bound(family, t, eta, field):
    """Prop A.2, Eq. (11), for alpha + beta < 1 (4 x 4 grid), per y:
      (11) Q_{a+b}(L | y) >= [((1-t)/t) Q_a(G | y) - Q_{1-b}(E | y)]_+,
    and, as a labelled consequence (not a check), Eq. (9):
      (9)  E_Y Q_{a+b}(L^2 | Y) >= ((1-t)^2/t^2) E_Y [Q_a(G | Y) - Q_{1-b}(U | Y)]_+^2,
           U = (t/(1-t)) E, averaged over N_Y endpoints Y ~ q.
    v_theta = v_p + err (bridge_draws: a smooth field, and the aligned worst case),
    L = ||v_theta - (y - X0)||, E = ||v_theta - v_p||.

    Population quantiles are replaced by empirical ones over N_X0 seeds. To keep sampling
    error from flipping the inequality, each side is moved to the end of its DKW band
    (dkw_margin, all 3 N_Y laws jointly at confidence 1 - 1e-6): the test fails only if even
    the largest plausible left side lies below the smallest plausible right side.
    Separately, the inequalities hold exactly for the empirical law itself (it is a probability
    law, and L >= ((1-t)/t) G - E holds pointwise), which is checked up to float64 rounding.
    """
    L, E, G = bridge_draws(t, eta, field, family=family)
    e = dkw_margin(N_X0, 3 * N_Y)
    k = (1 - t) / t
    U = E / k
    for a, b in itertools.product(ALPHAS, BETAS):
        lhs_hi = quantile(L, a + b + e, axis=1)
        rhs_lo = np.maximum(k * quantile(G, a - e, axis=1) - quantile(E, 1 - b + e, axis=1), 0)
        assert np.all(lhs_hi >= rhs_lo), (a, b, lhs_hi - rhs_lo)                       # (11)
        eq9_lhs = quantile(L**2, a + b + e, axis=1).mean()
        eq9_rhs = k**2 * (np.maximum(quantile(G, a - e, axis=1) - quantile(U, 1 - b + e, axis=1), 0) ** 2).mean()
        assert eq9_lhs >= eq9_rhs, (a, b, eq9_lhs, eq9_rhs)            # (9), consequence
        # The empirical law itself: exact, no margin, float64 rounding tolerance.
        lhs = quantile(L, a + b, axis=1)
        rhs = np.maximum(k * quantile(G, a, axis=1) - quantile(E, 1 - b, axis=1), 0)
        assert np.all(lhs - rhs >= -ROUNDING_RTOL * (1 + np.abs(lhs))), (a, b, (lhs - rhs).min())


def test_prop_a_2_display_before_eq_9_typo():
    """App. A.4, display just before "which yields the main-text quantile bridge (9)": it reads
    Q_{a+b}((E~)^2 | Y) >= ((1-t)^2/t^2) [Q_a(G | Y) - Q_{1-b}(U | Y)]_+^2 with E~ = ||v_theta - v_p||.
    Read literally this is false: for v_theta = v_p the left side is 0 while the right side is
    ((1-t)^2/t^2) Q_a(G)^2 > 0. With L~ (the residual) in place of E~ it is Eq. (12) rescaled,
    which holds ((11) squared). This test pins the counterexample recorded in the README.
    """
    t, a, b = 0.5, 0.1, 0.1
    L, E, G = bridge_draws(t, 0.0)
    k = (1 - t) / t
    rhs = k**2 * np.maximum(quantile(G, a, axis=1) - quantile(E / k, 1 - b, axis=1), 0) ** 2
    assert np.all(quantile(E**2, a + b, axis=1) == 0) and np.all(rhs > 0)          # typo: violated
    assert np.all(quantile(L**2, a + b, axis=1) >= rhs * (1 - ROUNDING_RTOL))      # with L~: holds
