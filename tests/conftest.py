"""Suite-wide settings: hypothesis profiles and real-peer requirements.

Profiles: ``ci`` (default; derandomized and bounded so CI is reproducible), ``dev``
(random, a bit more) and ``fuzz`` (long local runs). Select with HYPOTHESIS_PROFILE.
"""

from __future__ import annotations

import os
import shutil

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, max_examples=200, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=300, deadline=None)
settings.register_profile("fuzz", max_examples=20_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

IN_CI = os.environ.get("CI", "").lower() == "true"


def require_tool(name: str, package: str) -> str:
    """Path of a system tool a test needs; skip locally, fail in CI when it is missing."""
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed (Debian package {package}); run `make test` as root"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def sipp() -> str:
    return require_tool("sipp", "sip-tester")
