"""How many intra-op CPU threads ssiu uses, chosen so that a busy CPU does not collapse.

PyTorch runs CPU ops on an OpenMP pool whose threads, by default, spin at every barrier.
On a shared machine where other processes hold the cores, a spinning thread waits for a
descheduled sibling: a training step with 2 threads ran 76x slower than with 1 thread on
a loaded 2-core CPU (issue 14). Three defences, used by every command and by the tests:

- passive waiting: `prefer_passive_waiting()` sets OMP_WAIT_POLICY=PASSIVE (idle threads
  sleep instead of spinning) unless the user set it; it only acts before torch loads, so
  the CLI and tests/conftest.py call it first thing;
- a probe: `choose_threads()` times a small convolution at 1 thread and at the default
  count and keeps the faster (well under a second);
- an override: `--threads N` on the commands, or SSIU_THREADS=N, skips the probe.

`limited_threads(n)` applies a count inside a `with` block and restores the previous one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time

ENV_VAR = "SSIU_THREADS"
# The multi-thread pool must beat one thread by this factor to be kept: one thread never
# collapses, so ties go to it.
MARGIN = 0.85


def prefer_passive_waiting() -> bool:
    """OMP_WAIT_POLICY=PASSIVE unless already set; True when it can still take effect
    (the OpenMP runtime reads it once, when torch is first imported)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return "torch" not in sys.modules


def parse_threads(text: str | int | None) -> int | None:
    """'auto' / None -> None (probe), else a count >= 1."""
    if text is None or (isinstance(text, str) and text.strip().lower() == "auto"):
        return None
    try:
        n = int(text)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ValueError(f"threads must be 'auto' or an int >= 1, got {text!r}")
    return n


@dataclasses.dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str

    def line(self) -> str:
        return f"CPU threads: {self.threads} ({self.reason})"


def choose_threads(requested: str | int | None = None, probe: bool = True) -> ThreadChoice:
    """The intra-op thread count to use: `requested`, else SSIU_THREADS, else a probe.

    Without a probe (probe=False, or one usable core) the default count is kept, or 1 when
    the user has not fixed it with OMP_NUM_THREADS.
    """
    import torch

    n = parse_threads(requested)
    if n is not None:
        return ThreadChoice(n, "--threads")
    n = parse_threads(os.environ.get(ENV_VAR))
    if n is not None:
        return ThreadChoice(n, ENV_VAR)
    default = torch.get_num_threads()
    if "OMP_NUM_THREADS" in os.environ:
        return ThreadChoice(default, "OMP_NUM_THREADS")
    if default <= 1:
        return ThreadChoice(1, "one core available")
    if not probe:
        return ThreadChoice(default, "default, not probed")
    one, many = _probe_ms(1), _probe_ms(default)
    best = default if many < MARGIN * one else 1
    return ThreadChoice(
        best,
        f"probe: {one:.1f} ms with 1 thread, {many:.1f} ms with {default}; --threads N sets it",
    )


def _probe_ms(threads: int, reps: int = 5) -> float:
    """Median ms of a small conv forward + backward (the shape of SSIU's work) at `threads`."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 48, 48, generator=gen, requires_grad=True)
    w = torch.randn(32, 32, 3, 3, generator=gen, requires_grad=True)
    times = []
    with limited_threads(threads):
        for i in range(reps + 1):
            t = time.perf_counter()
            F.conv2d(x, w, padding=1).square().mean().backward()
            if i:  # the first run warms the pool up
                times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


@contextlib.contextmanager
def limited_threads(threads: int | None):
    """torch.set_num_threads(threads) inside the block, the previous count restored after;
    None leaves it alone."""
    import torch

    previous = torch.get_num_threads()
    if threads is not None and threads != previous:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


__all__ = [
    "ThreadChoice",
    "choose_threads",
    "limited_threads",
    "parse_threads",
    "prefer_passive_waiting",
]
