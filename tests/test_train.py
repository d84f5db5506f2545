"""ssiu.losses and ssiu.training: the loss, a few steps of a tiny model, checkpoints, resume."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

import ssiu
from ssiu import data, training
from ssiu.losses import SSIULoss, frequency_l1, spectrum, ssiu_loss

TINY = {"channels": 16, "heads": 2, "steps": 3}
FAST = {"batch_size": 2, "patch_size": 16, "log_every": 1, "progress": False}


@pytest.fixture(scope="module")
def photos():
    images = data.sample_images(["chelsea", "coffee"])
    return {name: image[:96, :96] for name, image in images.items()}


def run(photos, out_dir, **kw):
    options = {"scale": 2, "model_options": TINY, "val_every": 0, **FAST, **kw}
    if "resume" in options:
        options.pop("scale")
        options.pop("model_options")
    return training.train(dataset=photos, out_dir=out_dir, **options)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------
# Loss


def test_loss_value_on_known_input():
    sr = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    hr = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    # L1 = 1; rfft2(ones 2x2) = [[4, 0]] (+ zeros): 8 stacked reals, one of them 4 -> 0.5
    assert spectrum(hr).shape == (1, 1, 2, 2, 2)
    assert frequency_l1(sr, hr).item() == pytest.approx(0.5)
    assert ssiu_loss(sr, hr).item() == pytest.approx(1.005)
    assert SSIULoss(freq_weight=0)(sr, hr).item() == pytest.approx(1.0)


def test_loss_matches_formula():
    gen = torch.Generator().manual_seed(0)
    sr, hr = torch.rand(2, 3, 6, 5, generator=gen), torch.rand(2, 3, 6, 5, generator=gen)
    fs, fh = torch.fft.rfft2(sr), torch.fft.rfft2(hr)
    stacked = (torch.stack([fs.real, fs.imag], -1) - torch.stack([fh.real, fh.imag], -1)).abs()
    expected = (sr - hr).abs().mean() + 0.01 * stacked.mean()
    torch.testing.assert_close(ssiu_loss(sr, hr), expected)
    with pytest.raises(ValueError, match="one shape"):
        ssiu_loss(sr, hr[:, :, :5])


def test_loss_gradient():
    gen = torch.Generator().manual_seed(1)
    sr = torch.rand(1, 2, 4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    hr = torch.rand(1, 2, 4, 6, dtype=torch.float64, generator=gen)
    assert torch.autograd.gradcheck(lambda x: ssiu_loss(x, hr), (sr,))
    half = sr.detach().to(torch.bfloat16).requires_grad_()
    ssiu_loss(half, hr.to(torch.bfloat16)).backward()  # FFT runs in float32
    assert half.grad is not None and torch.isfinite(half.grad.float()).all()


# ---------------------------------------------------------------------------------------------
# Training


def test_a_few_steps(photos, tmp_path):
    result = run(photos, tmp_path, iterations=8)
    losses = [e["loss"] for e in result.history["train"]]
    assert result.step == 8 and result.total_steps == 8 and len(losses) == 8
    assert all(np.isfinite(losses))
    assert min(losses[-3:]) < losses[0]  # it learns something even in 8 steps
    assert result.history["train"][-1]["lr"] == pytest.approx(1e-6)  # cosine reaches eta_min
    assert result.checkpoint == tmp_path / "checkpoint.pt"
    assert result.weights == tmp_path / "ssiu_x2.safetensors"
    assert (tmp_path / "history.json").is_file()
    ckpt = torch.load(result.checkpoint, weights_only=True)
    assert ckpt["format"] == "ssiu-train" and ckpt["step"] == 8
    assert ckpt["config"] == result.model.config.to_dict()
    assert {"optimizer", "scheduler", "rng", "history", "epoch", "params"} <= set(ckpt)
    for path in (result.weights, result.checkpoint):
        assert same_weights(ssiu.load(path, backend="torch"), result.model)


def test_resume_is_bit_identical(photos, tmp_path):
    full = run(photos, tmp_path / "full", iterations=6)
    part = run(photos, tmp_path / "part", iterations=6, stop_at=3)
    assert part.step == 3 and part.stopped_early
    assert not same_weights(part.model, full.model)
    torch.manual_seed(999)  # disturb the global RNG: the checkpoint restores it
    resumed = run(photos, tmp_path / "part", resume=tmp_path / "part" / "checkpoint.pt")
    assert resumed.step == 6 and not resumed.stopped_early
    assert same_weights(resumed.model, full.model)
    loss = lambda r: [(e["step"], e["loss"]) for e in r.history["train"]]
    assert loss(resumed) == loss(full)


def test_seed_makes_runs_repeatable(photos, tmp_path):
    a = run(photos, None, iterations=2, seed=5)
    b = run(photos, None, iterations=2, seed=5)
    c = run(photos, None, iterations=2, seed=6)
    assert same_weights(a.model, b.model) and not same_weights(a.model, c.model)
    assert a.checkpoint is None and a.weights is None  # out_dir=None writes nothing


def test_validation_reports_ssiu_and_bicubic(photos, tmp_path):
    val = data.sample_images(["astronaut"])
    result = run(photos, None, iterations=2, val_dataset=val, val_crop=24, val_every=1)
    steps = [e["step"] for e in result.history["val"]]
    assert steps == [0, 1, 2]
    last = result.history["val"][-1]
    assert {"psnr", "ssim", "bicubic_psnr", "bicubic_ssim", "images"} <= set(last)
    assert 10 < last["bicubic_psnr"] < 50 and 0 < last["bicubic_ssim"] <= 1
    assert list(last["images"]) == ["astronaut"]
    assert "bicubic" in training.format_metrics(last)


def test_hr_folder_time_limit_and_amp(photos, tmp_path):
    folder = tmp_path / "hr"
    for name, image in photos.items():
        data.save_image(image, folder / f"{name}.png")
    result = training.train(folder, scale=2, model_options=TINY, out_dir=None, iterations=50,
                         time_limit=1e-3, val_every=0, amp=True, **FAST)  # fmt: skip
    assert result.step == 1 and result.stopped_early  # stops after the step that ran out
    assert np.isfinite(result.last_loss)


def test_bad_inputs(photos, tmp_path):
    with pytest.raises(ValueError, match="no training data"):
        training.train(out_dir=None, iterations=1)
    with pytest.raises(ValueError, match="iterations or epochs"):
        run(photos, None, iterations=2, epochs=1)
    with pytest.raises(ValueError, match="smaller than the LR patch"):
        run(photos, None, iterations=1, patch_size=64)
    with pytest.raises(ValueError, match="lr must be > 0"):
        run(photos, None, iterations=1, lr=-1.0)
    with pytest.raises(ValueError, match="invalid device"):
        run(photos, None, iterations=1, device="gpu7")
    with pytest.raises(ValueError, match="x2 but the model is x4"):
        training.train(dataset=data.InMemoryPairs(photos, 2), scale=4, out_dir=None, iterations=1)
    not_ckpt = tmp_path / "weights.pt"
    torch.save({"a": torch.zeros(1)}, not_ckpt)
    with pytest.raises(ValueError, match="not an ssiu training checkpoint"):
        training.train(dataset=photos, resume=not_ckpt, out_dir=None)
    part = run(photos, tmp_path, iterations=4, stop_at=1)
    with pytest.raises(ValueError, match="batch_size=3 but the checkpoint"):
        run(photos, tmp_path, resume=part.checkpoint, batch_size=3)
    with pytest.raises(ValueError, match="scale=4 but the checkpoint is x2"):
        training.train(dataset=photos, resume=part.checkpoint, scale=4, out_dir=None)


def test_cli_train_and_resume(photos, tmp_path, capsys):
    folder = tmp_path / "hr"
    for name, image in photos.items():
        data.save_image(image, folder / f"{name}.png")
    parser = argparse.ArgumentParser()
    training.add_cli(parser.add_subparsers())
    common = ["--out", str(tmp_path / "run"), "--no-progress", "--val-every", "0"]
    args = parser.parse_args([
        "train", "--hr", str(folder), "--scale", "2", "--iters", "4", "--stop-at", "2",
        "--batch-size", "2", "--patch", "16", "--channels", "16", "--heads", "2",
        "--unfold-steps", "3", "--seed", "3", *common,
    ])  # fmt: skip
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "2/4 steps" in out and "--resume" in out
    args = parser.parse_args(["train", "--resume", str(tmp_path / "run" / "checkpoint.pt"),
                              *common])  # fmt: skip
    assert args.func(args) == 0  # data folder and recipe come from the checkpoint
    assert "done: 4/4 steps" in capsys.readouterr().out
    args = parser.parse_args(["train", "--hr", str(folder), "--init",
                              str(tmp_path / "run" / "ssiu_x2.safetensors"), "--iters", "1",
                              "--batch-size", "2", "--patch", "16", *common])  # fmt: skip
    assert args.func(args) == 0  # fine-tuning starts from the saved weights
    assert "done: 1/1 steps" in capsys.readouterr().out
    args = parser.parse_args(["train", "--scale", "2", *common])
    with pytest.raises(ValueError, match="--hr"):
        args.func(args)
