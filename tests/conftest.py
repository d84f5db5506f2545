"""Test setup: Triton interpreter without CUDA, seeding, NaN-poisoned kernel outputs, markers.

TRITON_INTERPRET must be set before triton is first imported (triton reads it when a
kernel is decorated), so it is set here, at collection, before any test module imports
ssiu.kernels.
"""

from __future__ import annotations

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_and_poison(monkeypatch):
    """Every test starts from seed 0, and kernel launchers NaN-fill what they allocate."""
    torch.manual_seed(0)
    monkeypatch.setenv("SSIU_POISON_EMPTY", "1")
    yield


@pytest.fixture
def kernel_device() -> torch.device:
    """Where kernel tests run: CUDA if present, else CPU through the interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
