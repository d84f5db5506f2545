"""Moved to the package: `ssiu.benchmark.harness` (so `ssiu bench` works when installed)."""

from ssiu.benchmark.harness import *  # noqa: F401,F403
from ssiu.benchmark.harness import CASES, PROVIDERS, get_cases  # noqa: F401
