import os

from hypothesis import HealthCheck, settings

# Few examples, no deadline: the machines are 2 shared cores.
settings.register_profile("minidist", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "minidist"))
