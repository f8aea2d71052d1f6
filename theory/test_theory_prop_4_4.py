"""Proposition 4.4: w(t) = t^2 is inverse-variance weighting of endpoint errors."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from theory.strategies import FAMILIES, THEORY, assert_equal_to_rounding, scenes


@pytest.mark.parametrize("family", FAMILIES)
@THEORY
@given(data=st.data())
def test_prop_4_4_endpoint_error_identity(family, data):
    """Prop 4.4 (App. A.8): for any field v (here the oracle of the *other* law q, so
    v != v_p), with y_hat = x_t + (1-t) v(x_t) and r = v(x_t) - (y - x0):
        ||y_hat - y||^2 = (1-t)^2 ||r||^2                          (the check),
        (t^2/(1-t)^2) ||y_hat - y||^2 = t^2 ||r||^2               (consequence: the weight).
    Left from the endpoint estimate, right from the velocity residual. Exact; float64 rounding.
    """
    _, q, t, x0, y = data.draw(scenes(family))
    x = (1 - t) * x0 + t * y
    v = q.velocity(t, x)
    endpoint_err2 = ((x + (1 - t) * v - y) ** 2).sum(1)
    r2 = ((v - (y - x0)) ** 2).sum(1)
    assert_equal_to_rounding(endpoint_err2, (1 - t) ** 2 * r2)
    assert_equal_to_rounding(t**2 / (1 - t) ** 2 * endpoint_err2, t**2 * r2)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_prop_4_4_rescaled_state_variance(t):
    """Prop 4.4 / §4.3: z_t = x_t / t = y + ((1-t)/t) x0 has Var(z_t | y) = ((1-t)/t)^2 I, the
    variance whose inverse is the weight t^2/(1-t)^2. Monte Carlo sample variance per
    coordinate (n = 100000, fixed y); for Gaussian z, SE(var_hat) = sigma^2 sqrt(2/(n-1));
    assert |var_hat - ((1-t)/t)^2| <= 5 SE.
    """
    rng = np.random.default_rng(9)
    n, y = 100_000, np.array([0.7, -2.0, 3.1])
    z = ((1 - t) * rng.standard_normal((n, 3)) + t * y) / t
    sigma2 = ((1 - t) / t) ** 2
    assert np.all(np.abs(z.var(0, ddof=1) - sigma2) <= 5 * sigma2 * np.sqrt(2 / (n - 1)))
