"""Weights files: ours (safetensors), the authors' (DataParallel dicts), errors."""

import pytest
import torch

import ssiu
from ssiu.checkpoint import CheckpointError, authors_key_map, to_authors_state_dict

TINY = dict(channels=16, heads=2, steps=3)


def tiny(scale=2, **options):
    torch.manual_seed(0)
    return ssiu.build(scale, **{**TINY, **options}).eval()


def outputs_equal(a, b, size=(1, 3, 17, 20)):
    x = torch.rand(*size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_save_then_load_is_bit_identical(tmp_path):
    model = tiny(3, attn_topk=16, moe_topk=2)
    ssiu.save(model, tmp_path / "m.safetensors")
    loaded = ssiu.load(tmp_path / "m.safetensors", backend="torch")
    assert loaded.config == model.config
    assert outputs_equal(model, loaded)


def test_save_into_missing_directory_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="directory"):
        ssiu.save(tiny(), tmp_path / "nope" / "m.safetensors")


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_authors_checkpoint_loads_and_infers_the_config(tmp_path, scale):
    model = tiny(scale)
    torch.save(
        {"model_state_dict": to_authors_state_dict(model), "epoch": 290},
        tmp_path / "theirs.pth",
    )
    loaded = ssiu.load(tmp_path / "theirs.pth")
    assert loaded.config == model.config
    assert outputs_equal(model, loaded)


def test_bare_state_dict_in_their_names_without_prefix(tmp_path):
    model = tiny(4)
    bare = {k.removeprefix("module."): v for k, v in to_authors_state_dict(model).items()}
    torch.save(bare, tmp_path / "bare.pt")
    assert outputs_equal(model, ssiu.load(tmp_path / "bare.pt"))


def test_bare_state_dict_in_our_names_with_options(tmp_path):
    model = tiny(2)
    torch.save(model.state_dict(), tmp_path / "ours.pt")
    loaded = ssiu.load(tmp_path / "ours.pt", attn_topk=16, moe_topk=1)
    assert (loaded.config.attn_topk, loaded.config.moe_topk) == (16, 1)
    assert loaded.config.scale == 2


def test_released_key_names_and_shapes():
    table = authors_key_map(ssiu.SSIUConfig(scale=4))
    theirs = {t for t, _ in table.values()}
    assert len(table) == len(ssiu.build(4).state_dict())
    for key in (
        "head.weight",
        "body.0.norm.body.weight",
        "body.8.s1.project_in1.weight",
        "body.8.s2.project_in2.0.bias",
        "body.8.s4.project_in2.1.weight",
        "body.8.ffn.project_out.bias",
        "body.3.s3.qkv_conv.weight",
        "body.3.s3.LocalProp.0.weight",
        "moe.fc_a.weight",
        "moe.fc_c.bias",
        "moe.fuse.weight",
        "tail.0.weight",
        "tail.3.weight",
        "tail.6.weight",
    ):
        assert key in theirs, key
    assert table["steps.0.esam.rel_h"] == ("body.0.s3.rel_h", (1, 10, 1, 8))
    assert table["steps.0.esam.rel_w"] == ("body.0.s3.rel_w", (1, 1, 10, 8))
    x2 = {t for t, _ in authors_key_map(ssiu.SSIUConfig(scale=2)).values()}
    assert "tail.3.weight" in x2 and "tail.6.weight" not in x2
    shapes = {k: tuple(v.shape) for k, v in to_authors_state_dict(ssiu.build(4)).items()}
    assert shapes["module.body.0.s3.qkv_conv.weight"] == (192, 64, 1, 1)
    assert shapes["module.body.0.s1.project_in2.1.weight"] == (64, 1, 3, 3)
    assert shapes["module.tail.0.weight"] == (256, 64, 1, 1)


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path):
    state = to_authors_state_dict(tiny(2))
    del state["module.body.1.s3.rel_h"]
    state["module.body.1.s3.extra"] = torch.zeros(1)
    torch.save({"model_state_dict": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        ssiu.load(tmp_path / "bad.pth")
    assert "body.1.s3.rel_h" in str(err.value) and "body.1.s3.extra" in str(err.value)

    state = to_authors_state_dict(tiny(2))
    state["module.body.2.s1.project_out.weight"] = torch.zeros(16, 16, 3, 3)
    torch.save({"model_state_dict": state}, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"body\.2\.s1\.project_out\.weight"):
        ssiu.load(tmp_path / "shape.pth")

    ours = tiny(2).state_dict()
    ours["steps.0.msgm_z.gate.bias"] = torch.zeros(3)
    ours.pop("moe.fuse.bias")
    torch.save(ours, tmp_path / "ours_bad.pt")
    with pytest.raises(CheckpointError) as err:
        ssiu.load(tmp_path / "ours_bad.pt")
    assert "steps.0.msgm_z.gate.bias" in str(err.value) and "moe.fuse.bias" in str(err.value)


def test_one_error_lists_missing_unexpected_and_misshaped_together(tmp_path):
    state = to_authors_state_dict(tiny(2))
    del state["module.body.1.s3.rel_h"]
    state["module.body.1.s3.extra"] = torch.zeros(1)
    state["module.body.2.s1.project_out.weight"] = torch.zeros(16, 16, 3, 3)
    torch.save({"model_state_dict": state}, tmp_path / "theirs.pth")
    with pytest.raises(CheckpointError) as err:
        ssiu.load(tmp_path / "theirs.pth")
    text = str(err.value)
    assert "missing keys: 1 (body.1.s3.rel_h)" in text
    assert "unexpected keys: 1 (body.1.s3.extra)" in text
    assert "mis-shaped: 1 (body.2.s1.project_out.weight (ours: steps.2.msgm_z.out.weight)" in text

    ours = tiny(2).state_dict()
    ours.pop("moe.fuse.bias")
    ours.pop("head.bias")
    ours["surplus"] = torch.zeros(2)
    ours["tail.to_rgb.bias"] = torch.zeros(4)
    torch.save(ours, tmp_path / "ours.pt")
    with pytest.raises(CheckpointError) as err:
        ssiu.load(tmp_path / "ours.pt")
    text = str(err.value)
    assert "missing keys: 2 (head.bias, moe.fuse.bias)" in text
    assert "unexpected keys: 1 (surplus)" in text
    assert "mis-shaped: 1 (tail.to_rgb.bias (file (4,), model (3,)))" in text


def test_corrupt_and_missing_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        ssiu.load(tmp_path / "junk.pt")
    good = tmp_path / "good.safetensors"
    ssiu.save(tiny(), good)
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError):
        ssiu.load(tmp_path / "cut.safetensors")
    with pytest.raises(FileNotFoundError):
        ssiu.load(tmp_path / "absent.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="dict"):
        ssiu.load(tmp_path / "list.pt")
    torch.save({"model_state_dict": {"foo": torch.zeros(1)}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an SSIU"):
        ssiu.load(tmp_path / "foreign.pt")


def test_load_sets_backend_and_eval(tmp_path):
    ssiu.save(tiny(), tmp_path / "m.safetensors")
    model = ssiu.load(tmp_path / "m.safetensors", backend="torch")
    assert not model.training and model.backend == "torch"
    with pytest.raises(ValueError, match="backend"):
        ssiu.load(tmp_path / "m.safetensors", backend="gpu")


def test_training_checkpoint_loads_its_ema_weights(tmp_path):
    model, ema = tiny(2), tiny(2)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.01)
    ckpt = {
        "format": "ssiu-train",
        "config": model.config.to_dict(),
        "params": model.state_dict(),
        "params_ema": ema.state_dict(),
    }
    torch.save(ckpt, tmp_path / "with_ema.pt")
    assert outputs_equal(ema, ssiu.load(tmp_path / "with_ema.pt"))
    del ckpt["params_ema"]
    torch.save(ckpt, tmp_path / "no_ema.pt")
    assert outputs_equal(model, ssiu.load(tmp_path / "no_ema.pt"))
