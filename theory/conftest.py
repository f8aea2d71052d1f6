"""Hypothesis profile for the theory checks.

The profile is registered, not loaded, so hypothesis tests elsewhere in the repository keep
their own settings; theory tests opt in with @settings(settings.get_profile("theory")).
derandomize=True makes every run draw the same examples, so CI cannot flake.
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "theory",
    derandomize=True,
    max_examples=40,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
