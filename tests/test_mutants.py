"""The planted bugs of tests/mutants.py, one test each (marker `mutants`, not in the
default run; `make mutants` prints the same as a table)."""

from __future__ import annotations

import pytest
from mutants import MUTANTS, run_baseline, run_mutant

pytestmark = pytest.mark.mutants


def test_unmutated_copy_passes_the_parity_tests():
    assert run_baseline(sorted({m.tests for m in MUTANTS})) == []


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_mutant_is_killed(mutant):
    status, detail, _ = run_mutant(mutant)
    assert status == "KILLED", f"{mutant.name}: {status} {detail}"
