"""Test setup: Triton interpreter without CUDA, CPU threads, seeding, NaN-poisoned kernel
outputs, markers.

TRITON_INTERPRET must be set before triton is first imported (triton reads it when a
kernel is decorated), so it is set here, at collection, before any test module imports
ssiu.kernels.
"""

from __future__ import annotations

import os

from ssiu import threads

# Before torch loads: idle OpenMP threads sleep instead of spinning (ssiu/threads.py).
threads.prefer_passive_waiting()

import torch  # noqa: E402

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
# One probe for the session: on a busy CPU the tests run on one thread rather than
# collapsing on two (SSIU_THREADS=N fixes the count).
THREADS = threads.choose_threads(probe=not HAS_CUDA)
torch.set_num_threads(THREADS.threads)


def pytest_report_header(config):
    return THREADS.line()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_and_poison(monkeypatch):
    """Every test starts from seed SSIU_TEST_SEED (0: reproducible; set another for fresh
    draws of every parity check), and kernel launchers NaN-fill what they allocate."""
    torch.manual_seed(int(os.environ.get("SSIU_TEST_SEED", "0")))
    monkeypatch.setenv("SSIU_POISON_EMPTY", "1")
    yield


@pytest.fixture
def kernel_device() -> torch.device:
    """Where kernel tests run: CUDA if present, else CPU through the interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def sparse_view(tmp_path):
    """make(shape, strides, fill=None): a float32 view with these strides over a sparse
    memory-mapped file, optionally filled. Only touched pages become real, so offsets past
    2**31 elements (the int64-offset tests) cost a few KB. Skips where mmap cannot."""
    count = iter(range(1_000_000))

    def make(shape, strides, fill=None):
        numel = 1 + sum((size - 1) * stride for size, stride in zip(shape, strides, strict=True))
        path = tmp_path / f"sparse{next(count)}.bin"
        with open(path, "wb") as f:
            f.truncate(numel * 4)
        try:
            storage = torch.from_file(str(path), shared=True, size=numel, dtype=torch.float32)
        except (RuntimeError, OSError) as e:  # pragma: no cover - no mmap of that size here
            pytest.skip(f"cannot map a sparse {numel * 4 / 2**30:.0f} GiB file: {e}")
        view = storage.as_strided(shape, strides)
        if fill is not None:
            view.copy_(fill)
        return view

    return make
