"""Moved to the package: `ssiu.benchmark.cases`."""

from ssiu.benchmark.cases import *  # noqa: F401,F403
