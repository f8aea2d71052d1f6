"""Proposition 4.1: the endpoint residual is (1 - t) times the velocity residual, pathwise."""

from hypothesis import given, settings

from theory.strategies import assert_equal_to_rounding, scenes


@settings(settings.get_profile("theory"))
@given(scenes())
def test_prop_4_1_endpoint_velocity_link(scene):
    """Prop 4.1: for x = (1-t) x0 + t y and any x0, y,
        y - mu_p(x) = (1-t) ((y - x0) - v_p(t, x)),
        ||y - mu_p(x)||^2 = (1-t)^2 ||v_p(t, x) - (y - x0)||^2.

    v_p = E[Y - X0 | X_t = x] by Gaussian conditioning (the definition, not (mu_p - x)/(1-t));
    mu_p = E[Y | X_t = x] from the mixture posterior. Exact; float64 rounding tolerance.
    """
    p, _, t, x0, y = scene
    x = (1 - t) * x0 + t * y
    lhs = y - p.posterior_mean(t, x)
    rhs = (1 - t) * ((y - x0) - p.velocity(t, x))
    assert_equal_to_rounding(lhs, rhs)
    assert_equal_to_rounding((lhs**2).sum(1), (1 - t) ** 2 * ((p.velocity(t, x) - (y - x0)) ** 2).sum(1))
    # The form used in App. A.2: mu_p(x) = x + (1-t) v_p(t, x).
    assert_equal_to_rounding(p.posterior_mean(t, x), x + (1 - t) * p.velocity(t, x))
