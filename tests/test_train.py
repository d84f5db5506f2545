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


# ---------------------------------------------------------------------------------------------
# Speed options: accumulation, EMA, activation checkpointing, AMP flag, logging


def test_accumulation_equals_one_big_batch(photos):
    big = run(photos, None, iterations=3, batch_size=4)
    accum = run(photos, None, iterations=3, batch_size=2, accum=2)
    losses = lambda r: [e["loss"] for e in r.history["train"]]
    assert losses(accum) == pytest.approx(losses(big), rel=1e-5)
    for (name, a), b in zip(big.model.state_dict().items(),
                            accum.model.state_dict().values(), strict=True):  # fmt: skip
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="accum must be an int >= 1"):
        run(photos, None, iterations=1, accum=0)


def test_ema_weights_saved_and_exported(photos, tmp_path):
    result = run(photos, tmp_path, iterations=1, ema=0.25)
    training.seed_everything(training.RECIPE["seed"])
    start = ssiu.SSIU(ssiu.SSIUConfig(scale=2, **TINY)).state_dict()
    trained = result.model.state_dict()
    ema = result.ema_model.state_dict()
    for k in trained:  # one update from the initial weights: 0.25 w0 + 0.75 w1
        torch.testing.assert_close(ema[k], 0.25 * start[k] + 0.75 * trained[k], msg=k)
    ckpt = torch.load(result.checkpoint, weights_only=True)
    assert ckpt["settings"]["ema"] == 0.25
    assert all(torch.equal(ckpt["params_ema"][k], ema[k]) for k in ema)
    assert same_weights(ssiu.load(result.weights, backend="torch"), result.ema_model)
    resumed = run(photos, tmp_path, resume=result.checkpoint)  # keeps its EMA
    assert resumed.ema_model is not None and resumed.step == 1
    with pytest.raises(ValueError, match="ema must be a decay"):
        run(photos, None, iterations=1, ema=1.5)


def test_activation_checkpointing_gives_identical_gradients(photos):
    model = ssiu.build(2, **TINY)
    x = torch.rand(2, 3, 16, 16)

    def grads():
        model.zero_grad()
        model(x).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    training.set_activation_checkpointing(model, True)
    assert "forward" in vars(model.steps[0])
    checkpointed = grads()
    training.set_activation_checkpointing(model, False)
    assert "forward" not in vars(model.steps[0])
    assert all(torch.equal(a, b) for a, b in zip(plain, checkpointed, strict=True))
    a = run(photos, None, iterations=2)
    b = run(photos, None, iterations=2, checkpoint_steps=True)
    assert same_weights(a.model, b.model)


def test_amp_flag_throughput_and_memory_logged(photos, tmp_path, capsys):
    folder = tmp_path / "hr"
    for name, image in photos.items():
        data.save_image(image, folder / f"{name}.png")
    parser = argparse.ArgumentParser()
    training.add_cli(parser.add_subparsers())
    args = parser.parse_args([
        "train", "--hr", str(folder), "--scale", "2", "--iters", "2", "--batch-size", "2",
        "--patch", "16", "--channels", "16", "--heads", "2", "--unfold-steps", "3",
        "--out", str(tmp_path / "run"), "--no-progress", "--val-every", "0", "--amp", "bf16",
        "--accum", "2", "--ema", "0.9", "--checkpoint-steps",
    ])  # fmt: skip
    assert args.amp == "bf16" and args.accum == 2 and args.ema == 0.9 and args.checkpoint_steps
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "img/s" in out and "peak memory" in out and "(EMA)" in out
    assert parser.parse_args(["train", "--amp"]).amp == "bf16"  # --amp alone, as before
    assert parser.parse_args(["train"]).amp == "off"
    entry = run(photos, None, iterations=1, amp="bf16").history["train"][-1]
    assert entry["img_s"] > 0 and entry["peak_mem_mb"] > 0
    with pytest.raises(ValueError, match="amp must be one of"):
        run(photos, None, iterations=1, amp="fp16")


@pytest.mark.interpreter
@pytest.mark.slow
def test_fused_ops_under_autocast_keep_fp32_master_weights():
    """Autocast hands the fused custom ops low-precision activations and fp32 weights.

    The launchers cast the weights to the activation dtype and return weight gradients in
    fp32, so no autocast registration is needed. The interpreter has no bf16, so this runs
    CPU autocast in fp16 (the same dtype plumbing); bf16 kernels are tested on a GPU.
    """
    model = ssiu.build(2, channels=16, heads=1, steps=3).set_backend("triton")
    seen = []
    # With a fused backend a step runs as one op (`ops.ssrem_step`): its submodules'
    # forwards are not called, so the hooks sit on the step and on MoE-FS.
    for module in (model.steps[0], model.moe):
        module.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    x = torch.rand(1, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(x)
    assert seen == [torch.float16] * 2
    out.float().square().mean().backward()
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
    with torch.no_grad():
        reference = model.set_backend("torch")(x)
    assert (out.float() - reference).abs().max() < 2e-2


def test_validation_frequency_follows_the_run_length():
    from ssiu.training.settings import default_val_every

    # a tiny run validates once, at its end; a long one ten times
    assert [default_val_every(n) for n in (1, 5, 30, 100, 1000)] == [1, 5, 10, 10, 100]


def test_train_options_are_the_config_fields():
    config = training.TrainConfig(iterations=3, out_dir=None)
    with pytest.raises(TypeError, match="no_such_option"):
        training.train(config=config, no_such_option=1)
