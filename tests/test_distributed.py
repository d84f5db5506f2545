"""Multi-process training (torchrun, DDP over gloo on CPU) equals the one-process run.

Two processes share every micro-batch (ssiu.distributed); the loss curve and the weights
match a one-process run with the same global batch, and the 2-process checkpoint
resumes in one process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ssiu import data, distributed, training

pytestmark = pytest.mark.slow

TINY = {"channels": 16, "heads": 2, "steps": 3}
ARGS = ["--scale", "2", "--iters", "4", "--batch-size", "4", "--patch", "16",
        "--channels", "16", "--heads", "2", "--unfold-steps", "3", "--seed", "3",
        "--log-every", "1", "--val-every", "0", "--no-progress", "--device", "cpu",
        "--backend", "torch"]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hr")
    for name, image in data.sample_images(["chelsea", "coffee", "astronaut"]).items():
        data.save_image(image[:64, :64], folder / f"{name}.png")
    return folder


def torchrun(nproc: int, args: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "ssiu", "train", *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_two_processes_match_one_and_resume_on_one(folder, tmp_path):
    out = torchrun(2, ["--hr", str(folder), "--out", str(tmp_path / "ddp"), "--stop-at", "2",
                       *ARGS])  # fmt: skip
    assert out.count("checkpoint:") == 1  # rank 0 alone reports and writes
    ckpt = tmp_path / "ddp" / "checkpoint.pt"
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [
        "checkpoint.pt", "history.json", "ssiu_x2.safetensors"]  # fmt: skip
    # Resume the 2-process checkpoint in this one process.
    resumed = training.train(resume=ckpt, out_dir=tmp_path / "ddp", progress=False,
                             log_every=1, val_every=0, device="cpu", backend="torch")  # fmt: skip
    single = training.train(folder, scale=2, model_options=TINY, iterations=4, batch_size=4,
                            patch_size=16, seed=3, log_every=1, val_every=0, progress=False,
                            out_dir=None, device="cpu", backend="torch")  # fmt: skip
    curve = lambda r: [(e["step"], e["loss"]) for e in r.history["train"]]
    assert [s for s, _ in curve(resumed)] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(curve(resumed), curve(single), strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    for (name, a), b in zip(single.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):  # fmt: skip
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)


def test_shard_splits_batches_evenly():
    d = distributed.Dist(rank=1, world_size=2)
    assert d.shard([0, 1, 2, 3]) == [2, 3]
    with pytest.raises(ValueError, match="divisible by the process count"):
        d.shard([0, 1, 2])
    assert distributed.Dist().shard([5, 6]) == [5, 6]
    assert not distributed.Dist().enabled and distributed.Dist().is_main
