"""Proposition 4.1: the endpoint residual is (1 - t) times the velocity residual, pathwise."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from theory.strategies import FAMILIES, THEORY, assert_equal_to_rounding, scenes


@pytest.mark.parametrize("family", FAMILIES)
@THEORY
@given(data=st.data())
def test_prop_4_1_endpoint_velocity_link(family, data):
    """Prop 4.1: for x = (1-t) x0 + t y and any x0, y,
        y - mu_p(x) = (1-t) ((y - x0) - v_p(t, x)).

    Left: mu_p = E[Y | X_t = x] by Gaussian conditioning of Y. Right: v_p = E[Y - X0 | X_t = x]
    from the conditional means of Y and of X0 (gmm.py), not from (mu_p - x)/(1-t). The identity
    holds exactly when the two conditional means satisfy t mu_p + (1-t) E[X0 | x] = x, which
    the code does not impose. The squared form ||y - mu_p||^2 = (1-t)^2 ||v_p - (y - x0)||^2
    and mu_p = x + (1-t) v_p are consequences. Exact; float64 rounding.
    """
    p, _, t, x0, y = data.draw(scenes(family))
    x = (1 - t) * x0 + t * y
    assert_equal_to_rounding(y - p.posterior_mean(t, x), (1 - t) * ((y - x0) - p.velocity(t, x)))
