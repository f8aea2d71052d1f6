"""Lemma 4.2 (Tweedie): the posterior mean of the endpoint from the score of the path marginal.

Part (i) is the check. Eq. (6) (subtract the cases r = q and r = p) and part (ii) / Eq. (10)
(part (i) for p and for a point mass at y, then Prop 4.1) are consequences; part (ii) is kept
as a labelled consequence because it is the form the quantile bridge (§4.4) uses.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from theory.gmm import conditional_score
from theory.strategies import FAMILIES, THEORY, assert_equal_to_rounding, scenes


@pytest.mark.parametrize("family", FAMILIES)
@THEORY
@given(data=st.data())
def test_lemma_4_2_tweedie(family, data):
    """Lemma 4.2(i): mu_r(x) = x/t + ((1-t)^2/t) s_{r_t}(x), for r in {p, q} and any x.

    Left: E[Y | X_t = x] from Bayes' rule (responsibilities times each component's Gaussian
    conditional mean m_k + t S_k C_k^{-1}(x - t m_k)); right: the closed-form score of r_t.
    Full-rank and image-like (eigenvalues down to 1e-6) mixtures. Exact; float64 rounding.
    """
    p, q, t, x0, y = data.draw(scenes(family))
    x = (1 - t) * x0 + t * y
    for r in (p, q):
        assert_equal_to_rounding(r.posterior_mean(t, x), x / t + (1 - t) ** 2 / t * r.score(t, x))


@pytest.mark.parametrize("family", FAMILIES)
@THEORY
@given(data=st.data())
def test_lemma_4_2_ii_pathwise_identity(family, data):
    """Consequence (not counted as a check): Lemma 4.2(ii), Eq. (10). For fixed y and any x0,
        y - mu_p(X_t) = ((1-t)^2/t) (s_{q_{t|y}}(X_t) - s_{p_t}(X_t)),
        (1-t) ||v_p(t, X_t) - (y - x0)|| = ((1-t)^2/t) ||s_{q_{t|y}}(X_t) - s_{p_t}(X_t)||,
    with s_{q_{t|y}}(x) = -(x - t y)/(1-t)^2. It follows from part (i) and Prop 4.1; it is shown
    end to end because Eq. (8) (quantiles commute with the positive factor (1-t)/t) and
    Prop A.2 rest on it. Exact; float64 rounding.
    """
    p, _, t, x0, y = data.draw(scenes(family))
    x = (1 - t) * x0 + t * y
    gap = conditional_score(t, x, y) - p.score(t, x)
    assert_equal_to_rounding(y - p.posterior_mean(t, x), (1 - t) ** 2 / t * gap)
    assert_equal_to_rounding((1 - t) * np.linalg.norm(p.velocity(t, x) - (y - x0), axis=1),
                             (1 - t) ** 2 / t * np.linalg.norm(gap, axis=1))
