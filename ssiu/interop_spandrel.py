"""Let spandrel (the model loader of ComfyUI and chaiNNer) load SSIU weights.

    import spandrel, ssiu.interop_spandrel
    ssiu.interop_spandrel.register()                     # once per process; idempotent
    model = spandrel.ModelLoader().load_from_file("SSIU_x4.pth")
    model.scale, model.purpose                           # 4, "SR"
    sr = model(lr)                                       # (1, 3, H, W) in [0, 1] -> x4

spandrel 0.4 finds architectures only in its registries (`spandrel.MAIN_REGISTRY`, or
one passed to `ModelLoader(registry=...)`); it has no entry-point discovery, so nothing
happens until `register()` is called. Both weight formats are detected by their
parameter names: the authors' files (`body.N.s3.rel_h`, `moe.fc_a.weight`, ...,
`module.` prefix and `model_state_dict` wrapper stripped by spandrel) and ours
(`steps.N.esam.rel_h`, `moe.gates.0.weight`, ...; safetensors or training checkpoints).
Scale, channels, steps and heads come from the shapes (`ssiu.checkpoint.infer_config`).

What spandrel cannot carry: spandrel reads only the tensors of a file, not our
safetensors metadata, so `attn_topk` / `moe_topk` are the released defaults (dense
attention, 3 experts). A model trained with top-k options must be loaded with
`ssiu.load(path)` (which reads them from the metadata), or through `register(
attn_topk=..., moe_topk=...)`, which applies them to every SSIU file spandrel loads.

The detection and conversion functions here need no spandrel; `register()` and
`architecture()` import it. spandrel imports torchvision when it is imported; a
torchvision built for another torch (e.g. PyPI's CUDA wheel beside a CPU torch) makes
that fail, and `register()` then says so and how to fix it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ssiu.checkpoint import CheckpointError, authors_key_map, infer_config
from ssiu.config import SSIUConfig
from ssiu.model import SSIU, min_input_size

ARCH_ID = "SSIU"
ARCH_NAME = "SSIU"
# One parameter of every kind the network has, in each naming (step 0 stands for all).
AUTHORS_KEYS = (
    "head.weight",
    "body.0.norm.body.weight",
    "body.0.s1.project_in1.weight",
    "body.0.s2.project_in2.1.weight",
    "body.0.s3.qkv_conv.weight",
    "body.0.s3.rel_h",
    "body.0.s3.rel_w",
    "body.0.s3.LocalProp.0.weight",
    "body.0.s4.project_out.weight",
    "body.0.ffn.project_out.weight",
    "moe.fc_a.weight",
    "moe.fc_b.weight",
    "moe.fc_c.weight",
    "moe.fuse.weight",
    "tail.0.weight",
)
OUR_KEYS = (
    "head.weight",
    "steps.0.norm.weight",
    "steps.0.msgm_z.gate.weight",
    "steps.0.msgm_beta.depthwise.weight",
    "steps.0.esam.qkv.weight",
    "steps.0.esam.rel_h",
    "steps.0.esam.rel_w",
    "steps.0.esam.local_prop.weight",
    "steps.0.msgm_refine.out.weight",
    "steps.0.msgm_ffn.out.weight",
    "moe.gates.0.weight",
    "moe.gates.2.weight",
    "moe.fuse.weight",
    "tail.upsample.0.weight",
    "tail.to_rgb.weight",
)


def _strip_module_prefix(state: Mapping) -> dict:
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def naming(state: Mapping) -> str | None:
    """Return "authors" or "ours" for SSIU parameter names, else None (reads no tensor)."""
    for name, keys in (("authors", AUTHORS_KEYS), ("ours", OUR_KEYS)):
        if all(k in state for k in keys):
            return name
    return None


def detect(state: Mapping) -> bool:
    """True for an SSIU state dict in the authors' or our names (spandrel canonicalises
    the `module.` prefix away before calling this; it is accepted here too)."""
    return naming(_strip_module_prefix(state)) is not None


def _few(names: list[str], limit: int = 10) -> str:
    shown = str(names[:limit])
    return shown if len(names) <= limit else f"{shown[:-1]}, ...] ({len(names)} in all)"


def to_our_state_dict(state: Mapping, **options) -> tuple[SSIUConfig, dict]:
    """(config, state dict in our names and shapes) from an SSIU state dict in either naming.

    options: SSIUConfig fields the weights cannot tell (attn_topk, moe_topk).
    Raises CheckpointError naming missing or unexpected keys.
    """
    state = _strip_module_prefix(state)
    kind = naming(state)
    if kind is None:
        raise CheckpointError("not an SSIU state dict (neither the authors' names nor ours)")
    config = infer_config(state, kind == "authors", **options)
    if kind == "ours":
        return config, state
    table = authors_key_map(config)
    theirs = {name for name, _ in table.values()}
    missing = sorted(theirs - set(state))
    # Non-tensor entries (e.g. a stray counter) are ignored like spandrel's own loaders do.
    unexpected = sorted(k for k in set(state) - theirs if isinstance(state[k], torch.Tensor))
    if missing or unexpected:
        raise CheckpointError(
            f"authors' SSIU checkpoint does not match an x{config.scale} SSIU with "
            f"{config.steps} steps: missing {_few(missing)}, unexpected {_few(unexpected)}"
        )
    own_shapes = {k: v.shape for k, v in SSIU(config).state_dict().items()}
    converted = {}
    for ours, (their_name, their_shape) in table.items():
        tensor = state[their_name]
        if their_shape is not None and tensor.numel() == own_shapes[ours].numel():
            tensor = tensor.reshape(own_shapes[ours])  # rel_h, rel_w: (1, 10, 1, 8) -> (10, 8)
        converted[ours] = tensor
    return config, converted


def tags(config: SSIUConfig) -> list[str]:
    """spandrel tags: channels, steps and any non-released sparsity option."""
    out = [f"{config.channels}nf", f"{config.steps}steps"]
    if not config.dense_attention:
        out.append(f"attn_topk{config.attn_topk}")
    if config.moe_topk != 3:
        out.append(f"moe_topk{config.moe_topk}")
    return out


_TORCHVISION_HELP = (
    "spandrel could not be imported: it imports torchvision, and the installed torchvision "
    "does not work with torch {torch} ({error}). This happens when torchvision was built "
    "for another torch, typically PyPI's CUDA wheel of torchvision beside a CPU build of "
    "torch: its C extension cannot load (it needs libtorch_cuda), and registering its "
    "operators then fails with 'operator torchvision::nms does not exist'. Install the "
    "torchvision made for your torch, e.g. for a CPU torch {torch_short}: pip install "
    "torchvision=={tv} --index-url https://download.pytorch.org/whl/cpu"
)


def _matching_torchvision() -> str:
    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return f"0.{int(m.group(2)) + 15}.*" if m and m.group(1) == "2" else "<matching version>"


def import_spandrel():
    """Import spandrel, turning a broken torchvision into an ImportError that explains it."""
    try:
        import spandrel
    except ImportError as e:
        if e.name == "spandrel":
            raise ImportError(
                "spandrel is not installed: pip install -e '.[spandrel]' in the ssiu checkout "
                "(or pip install spandrel); it may replace a CPU torch with a CUDA build, see "
                "the README's 'Loading SSIU with spandrel'"
            ) from e
        raise
    except RuntimeError as e:
        if "torchvision" not in str(e):
            raise
        raise ImportError(
            _TORCHVISION_HELP.format(
                torch=torch.__version__,
                torch_short=torch.__version__.split("+")[0],
                error=str(e).strip().splitlines()[-1],
                tv=_matching_torchvision(),
            )
        ) from e
    return spandrel


def architecture(**options):
    """A spandrel `Architecture` for SSIU; `options` (attn_topk, moe_topk) apply to every load."""
    spandrel = import_spandrel()

    class SSIUArch(spandrel.Architecture[SSIU]):
        def __init__(self) -> None:
            super().__init__(id=ARCH_ID, name=ARCH_NAME, detect=detect)

        def load(self, state_dict):
            config, state = to_our_state_dict(state_dict, **options)
            model = SSIU(config).set_backend("auto")  # fused kernels on CUDA, else reference
            return spandrel.ImageModelDescriptor(
                model,
                state,  # spandrel calls model.load_state_dict(state) (strict)
                architecture=self,
                purpose="SR",
                tags=tags(config),
                # fp16 is not declared: the network is not validated in fp16 (inference
                # guards against its overflow); bf16 runs on the reference and the kernels.
                supports_half=False,
                supports_bfloat16=True,
                scale=config.scale,
                input_channels=3,
                output_channels=3,
                # The network reflect-pads to a multiple of 16 itself; it only needs sides
                # >= 9 for that pad to exist (spandrel pads smaller inputs up to 9).
                size_requirements=spandrel.SizeRequirements(minimum=min_input_size()),
                tiling=spandrel.ModelTiling.SUPPORTED,
            )

    return SSIUArch()


def register(registry=None, **options):
    """Add SSIU to spandrel's `registry` (default `spandrel.MAIN_REGISTRY`); idempotent.

    options: attn_topk / moe_topk applied to every SSIU model loaded through this entry
        (default: the released dense model). A second call keeps the first registration.
    Returns the registry's `ArchSupport` for SSIU.
    """
    spandrel = import_spandrel()
    registry = spandrel.MAIN_REGISTRY if registry is None else registry
    if ARCH_ID not in registry:
        registry.add(
            spandrel.ArchSupport.from_architecture(architecture(**options)), ignore_duplicates=True
        )
    return registry[ARCH_ID]


__all__ = [
    "ARCH_ID",
    "AUTHORS_KEYS",
    "OUR_KEYS",
    "architecture",
    "detect",
    "import_spandrel",
    "naming",
    "register",
    "tags",
    "to_our_state_dict",
]
