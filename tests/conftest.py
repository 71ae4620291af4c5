import os

from hypothesis import HealthCheck, settings

# Model-sized examples are slow to build; no per-example deadline, a budget per test instead.
settings.register_profile("default", deadline=None, max_examples=80,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", deadline=None, max_examples=300,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
