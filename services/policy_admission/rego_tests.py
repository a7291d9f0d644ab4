"""The bundle's Rego test runner, shared with ``mctl policy test``: see :mod:`libs.rego_tests`."""

from libs.rego_tests import RegoTest, RegoTestResult, discover, discover_sources, run, run_sources

__all__ = ["RegoTest", "RegoTestResult", "discover", "discover_sources", "run", "run_sources"]
