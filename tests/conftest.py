"""Shared pytest configuration: hypothesis profiles and the array-module fixture.

Profiles: ``dev`` (default, random, 30 examples) and ``ci`` (derandomized, no deadline,
selected by ``HYPOTHESIS_PROFILE=ci`` as .ci/run does).
"""
import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "dev", deadline=None, max_examples=30,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
