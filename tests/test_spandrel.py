"""spandrel interoperability: detection, conversion, and loading through spandrel.

The detection/conversion tests need no spandrel. The loading tests need spandrel (and
the torchvision it imports) and skip with the reason when it cannot be imported.

Workaround for CPU-only CI: PyPI's Linux torchvision wheels are CUDA builds. Beside a CPU
torch their C extension cannot load (it links libtorch_cuda.so), and `import
torchvision` then fails registering fake kernels for `torchvision::nms`/`qnms` ("operator
torchvision::nms does not exist"). spandrel imports torchvision at import time (LaMa,
RestoreFormer) but uses only pure-Python transforms. Here, and only here, the two
operator schemas are declared (no kernels) so that torchvision, and with it spandrel,
import; users install the torchvision built for their torch instead.
"""

from __future__ import annotations

import builtins
import importlib
import sys

import pytest
import torch

import ssiu
from ssiu import interop_spandrel as isp
from ssiu.checkpoint import CheckpointError, to_authors_state_dict


def tiny(scale=4, **options):
    torch.manual_seed(0)
    return ssiu.build(scale=scale, channels=16, steps=3, **options).eval()


# ----------------------------------------------------------------------------- no spandrel


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_detect_and_convert_both_namings(scale):
    model = tiny(scale)
    ours = model.state_dict()
    theirs = to_authors_state_dict(model)  # with the `module.` prefix, as released
    assert isp.naming(ours) == "ours" and isp.detect(ours)
    assert isp.detect(theirs)
    assert isp.naming({k.removeprefix("module."): v for k, v in theirs.items()}) == "authors"
    for state in (ours, theirs):
        config, converted = isp.to_our_state_dict(state)
        assert config == model.config
        assert converted.keys() == ours.keys()
        assert all(torch.equal(converted[k], ours[k]) for k in ours)


def test_detect_rejects_other_networks():
    assert not isp.detect({})
    assert not isp.detect(torch.nn.Conv2d(3, 3, 3).state_dict())
    # an ESRGAN-like dict sharing some generic names
    assert not isp.detect({"head.weight": torch.zeros(1), "body.0.weight": torch.zeros(1),
                           "tail.0.weight": torch.zeros(1)})  # fmt: skip
    partial = dict(tiny().state_dict())
    del partial["moe.fuse.weight"]
    assert not isp.detect(partial)


def test_conversion_errors_and_options():
    model = tiny()
    theirs = to_authors_state_dict(model)
    theirs["module.moe.extra.weight"] = torch.zeros(1)
    del theirs["module.body.1.s3.rel_w"]
    expected = r"missing \['body.1.s3.rel_w'\], unexpected \['moe.extra.weight'\]"
    with pytest.raises(CheckpointError, match=expected):
        isp.to_our_state_dict(theirs)
    with pytest.raises(CheckpointError, match="not an SSIU state dict"):
        isp.to_our_state_dict({"conv.weight": torch.zeros(1)})
    config, _ = isp.to_our_state_dict(model.state_dict(), attn_topk=16, moe_topk=1)
    assert (config.attn_topk, config.moe_topk) == (16, 1)
    assert isp.tags(config) == ["16nf", "3steps", "attn_topk16", "moe_topk1"]


@pytest.mark.parametrize("scale", [2, 4])
def test_hyperparameters_survive_a_load(scale):
    # What spandrel's test helper `assert_loads_correctly` checks: a model has a
    # `hyperparameters` dict, and the model loaded from its state dict (as is, and in the
    # authors' names) has the same one.
    model = tiny(scale)
    assert model.hyperparameters == model.config.to_dict()
    assert model.hyperparameters["scale"] == scale and model.hyperparameters["channels"] == 16
    for state in (model.state_dict(), to_authors_state_dict(model)):
        config, _ = isp.to_our_state_dict(state)
        assert ssiu.SSIU(config).hyperparameters == model.hyperparameters


def test_install_hint_names_an_existing_extra(monkeypatch):
    from pathlib import Path

    import tomllib

    pyproject = Path(__file__).parents[1] / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("spandrel") for dep in extras["spandrel"])
    real_import = builtins.__import__

    def no_spandrel(name, *args, **kwargs):
        if name == "spandrel":
            raise ImportError("No module named 'spandrel'", name="spandrel")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "spandrel", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_spandrel)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[spandrel\]'"):
        isp.import_spandrel()


def test_broken_torchvision_becomes_a_clear_import_error(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "spandrel":
            raise RuntimeError("operator torchvision::nms does not exist")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "spandrel", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"torchvision.*download.pytorch.org/whl/cpu"):
        isp.import_spandrel()


# ----------------------------------------------------------------------------- spandrel

_TORCHVISION_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_keep_alive = []


def _import_spandrel_for_tests():
    try:
        return importlib.import_module("spandrel")
    except ImportError as e:
        pytest.skip(f"spandrel cannot be imported: {e}")
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    # torchvision built for CUDA beside a CPU torch (see the module docstring)
    for name in list(sys.modules):
        if name.split(".")[0] in ("torchvision", "spandrel"):
            del sys.modules[name]
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op, schema in _TORCHVISION_SCHEMAS.items():
        if not hasattr(torch.ops.torchvision, op):
            lib.define(schema)
    _keep_alive.append(lib)
    try:
        return importlib.import_module("spandrel")
    except (ImportError, RuntimeError) as e:
        pytest.skip(f"spandrel cannot be imported beside torch {torch.__version__}: {e}")


@pytest.fixture(scope="module")
def spandrel():
    module = _import_spandrel_for_tests()
    support = isp.register()
    assert isp.register() is support  # idempotent
    assert support.architecture.id == "SSIU"
    return module


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """x4 and x3 tiny models as: the authors' torch.save dict (.pth and .pt), ours."""
    folder = tmp_path_factory.mktemp("weights")
    out = {}
    for scale in (4, 3):
        model = tiny(scale)
        authors = {"model_state_dict": to_authors_state_dict(model), "epoch": 290}
        torch.save(authors, folder / f"authors_x{scale}.pth")
        torch.save(authors, folder / f"authors_x{scale}.pt")
        ssiu.save(model, folder / f"ours_x{scale}.safetensors")
        out[scale] = model
    return folder, out


@pytest.mark.parametrize(
    "name", ["authors_x4.pth", "authors_x4.pt", "ours_x4.safetensors", "authors_x3.pth",
             "ours_x3.safetensors"],
)  # fmt: skip
def test_model_loader_gives_ssiu(spandrel, files, name):
    folder, models = files
    scale = int(name.split("_x")[1][0])
    loader = spandrel.ModelLoader()
    state = loader.load_state_dict_from_file(folder / name)
    detected = [a.architecture.id for a in loader.registry.architectures("detection")
                if a.detect(state)]  # fmt: skip
    assert detected == ["SSIU"]  # no built-in spandrel architecture claims these weights
    descriptor = loader.load_from_file(folder / name)
    assert isinstance(descriptor, spandrel.ImageModelDescriptor)
    assert isinstance(descriptor.model, ssiu.SSIU)
    assert descriptor.architecture.id == "SSIU" and descriptor.purpose == "SR"
    assert descriptor.scale == scale
    assert (descriptor.input_channels, descriptor.output_channels) == (3, 3)
    assert descriptor.size_requirements.minimum == 9
    assert descriptor.size_requirements.multiple_of == 1
    assert descriptor.tiling == spandrel.ModelTiling.SUPPORTED
    assert descriptor.supports_bfloat16 and not descriptor.supports_half
    assert descriptor.tags == ["16nf", "3steps"]
    x = torch.rand(1, 3, 21, 26)
    with torch.no_grad():
        expected = models[scale](x).clamp(0, 1)
    assert torch.equal(descriptor(x), expected)


def test_small_inputs_and_dtypes(spandrel, files):
    folder, models = files
    descriptor = spandrel.ModelLoader().load_from_file(folder / "authors_x4.pth")
    x = torch.rand(1, 3, 6, 11)  # below the minimum: spandrel pads to 9, crops the output
    assert descriptor(x).shape == (1, 3, 24, 44)
    with pytest.raises(spandrel.UnsupportedDtypeError):
        descriptor.half()
    descriptor.bfloat16()
    x = torch.rand(1, 3, 16, 20)
    out = descriptor(x.bfloat16())
    with torch.no_grad():
        expected = models[4](x).clamp(0, 1)
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected).abs().max() < 0.1
