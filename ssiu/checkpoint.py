"""Reading and writing SSIU weights: ours (safetensors + config) and the authors' files.

The authors' checkpoints are `torch.save` dicts with `model_state_dict`, saved from
`nn.DataParallel` (keys start with `module.`), in their parameter names (SSIU.md).
`authors_key_map` maps every parameter of ours to its name and shape there; loading
checks every key and shape before anything is copied, so nothing loads half-way.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ssiu.config import SSIUConfig
from ssiu.model import SSIU
from ssiu.modules import upsample_stages

FORMAT = "ssiu"
_MSGM_OURS_THEIRS = {"msgm_z": "s1", "msgm_beta": "s2", "msgm_refine": "s4", "msgm_ffn": "ffn"}
_MSGM_LAYERS = {
    "gate": "project_in1",
    "expand": "project_in2.0",
    "depthwise": "project_in2.1",
    "reduce": "project_in2.2",
    "out": "project_out",
}


class CheckpointError(ValueError):
    """A weights file that cannot be loaded as SSIU (names the offending keys)."""


def authors_key_map(config: SSIUConfig) -> dict[str, tuple[str, tuple[int, ...] | None]]:
    """Our parameter name -> (the authors' name, the authors' shape if it differs)."""
    d = config.head_dim
    win = config.window
    table: dict[str, tuple[str, tuple[int, ...] | None]] = {}

    def same(ours: str, theirs: str) -> None:
        for p in ("weight", "bias"):
            table[f"{ours}.{p}"] = (f"{theirs}.{p}", None)

    same("head", "head")
    for t in range(config.steps):
        step, body = f"steps.{t}", f"body.{t}"
        same(f"{step}.norm", f"{body}.norm.body")
        for ours, theirs in _MSGM_OURS_THEIRS.items():
            for layer, their_layer in _MSGM_LAYERS.items():
                same(f"{step}.{ours}.{layer}", f"{body}.{theirs}.{their_layer}")
        table[f"{step}.esam.qkv.weight"] = (f"{body}.s3.qkv_conv.weight", None)
        table[f"{step}.esam.rel_h"] = (f"{body}.s3.rel_h", (1, win, 1, d // 2))
        table[f"{step}.esam.rel_w"] = (f"{body}.s3.rel_w", (1, 1, win, d // 2))
        same(f"{step}.esam.local_prop", f"{body}.s3.LocalProp.0")
    for i, name in enumerate(("fc_a", "fc_b", "fc_c")):
        same(f"moe.gates.{i}", f"moe.{name}")
    same("moe.fuse", "moe.fuse")
    # The authors' tail is one nn.Sequential: conv, shuffle, GELU per stage, then the 3x3.
    stages = len(upsample_stages(config.scale))
    for i in range(stages):
        same(f"tail.upsample.{i}", f"tail.{3 * i}")
    same("tail.to_rgb", f"tail.{3 * stages}")
    return table


def _strip_prefix(state: dict) -> dict:
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


def _is_authors(state: dict) -> bool:
    return any(k.startswith("body.") for k in state)


def infer_config(state: dict, authors: bool, **overrides) -> SSIUConfig:
    """Scale, channels, steps, heads and window from the weights' names and shapes.

    Not in the weights: attn_topk and moe_topk (defaults: the released model, or
    `overrides`), and how the window splits into block + halo (halo 1 assumed).
    """
    try:
        channels = state["head.weight"].shape[0]
        step_re = re.compile(r"^(?:body|steps)\.(\d+)\.")
        steps = 1 + max(int(m.group(1)) for k in state if (m := step_re.match(k)))
        if authors:
            rel_h = state["body.0.s3.rel_h"]
            window, half = rel_h.shape[1], rel_h.shape[-1]
            stages = 2 if "tail.6.weight" in state else 1
            first_up = state["tail.0.weight"].shape[0]
        else:
            rel_h = state["steps.0.esam.rel_h"]
            window, half = rel_h.shape
            stages = sum(1 for k in state if re.match(r"^tail\.upsample\.\d+\.weight$", k))
            first_up = state["tail.upsample.0.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"not an SSIU state dict: cannot read its sizes ({e!r})") from None
    ratio = first_up // channels
    scale = 4 if stages == 2 else {4: 2, 9: 3}.get(ratio)
    if scale is None:
        raise CheckpointError(f"cannot infer the scale: first tail conv has {first_up} outputs")
    values = dict(
        scale=scale, channels=channels, steps=steps, heads=channels // (2 * half),
        block=window - 2, halo=1,
    )  # fmt: skip
    values.update(overrides)
    return SSIUConfig(**values)


def _key_list(keys) -> str:
    keys = list(keys)
    return f"{len(keys)} ({', '.join(keys)})"


def _raise_problems(what: str, missing=(), unexpected=(), mis_shaped=()) -> None:
    """One error listing every missing, unexpected and mis-shaped key together, if any."""
    problems = []
    if missing:
        problems.append(f"missing keys: {_key_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_key_list(unexpected)}")
    if mis_shaped:
        problems.append(f"mis-shaped: {_key_list(mis_shaped)}")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


def _convert_authors(state: dict, config: SSIUConfig) -> tuple[dict, list[str], list[str]]:
    """The authors' names -> ours, for the keys present; also (missing, unexpected) in
    their names, reported later together with any shape problem."""
    table = authors_key_map(config)
    expected = {theirs for theirs, _ in table.values()}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    converted = {ours: state[theirs] for ours, (theirs, _) in table.items() if theirs in state}
    return converted, missing, unexpected


def _load_into(model: SSIU, state: dict, their_names: dict | None = None, known=((), ())) -> None:
    """Check every key and shape first, then copy (all or nothing); one error lists all.

    their_names: ours -> the authors' key, for loading (and naming in errors) their files;
    known: (missing, unexpected) keys already found in the file's own names.
    """
    name_of = (lambda k: f"{their_names[k]} (ours: {k})") if their_names else (lambda k: k)
    own = model.state_dict()
    shaped = {}
    mis_shaped = []
    for name in sorted(set(own) & set(state)):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            mis_shaped.append(f"{name_of(name)} (not a tensor: {type(tensor).__name__})")
            continue
        if tensor.shape != own[name].shape:
            same_numel = tensor.numel() == own[name].numel()
            if their_names and same_numel and name.endswith(("rel_h", "rel_w")):
                tensor = tensor.reshape(own[name].shape)
            else:
                mis_shaped.append(
                    f"{name_of(name)} (file {tuple(tensor.shape)}, model {tuple(own[name].shape)})"
                )
                continue
        if not tensor.is_floating_point():
            mis_shaped.append(f"{name_of(name)} (dtype {tensor.dtype}, expected floating point)")
            continue
        shaped[name] = tensor
    missing, unexpected = known
    if their_names is None:
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    _raise_problems("weights do not match the model", missing, unexpected, mis_shaped)
    model.load_state_dict(shaped, strict=True)


def _read_file(path: Path, map_location) -> tuple[dict, dict | None]:
    """(state dict, our config dict or None) from any supported file."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    looks_safetensors = len(head) >= 9 and head[8:9] == b"{"
    if looks_safetensors:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
        config = json.loads(metadata["ssiu_config"]) if "ssiu_config" in metadata else None
        device = torch.device(map_location) if isinstance(map_location, str) else None
        if device is not None:
            state = {k: v.to(device) for k, v in state.items()}
        return state, config
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: neither a safetensors file nor a loadable torch checkpoint ({e})"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    if "model_state_dict" in obj:  # the authors' training script
        return obj["model_state_dict"], None
    if obj.get("format") == "ssiu-train":  # our training checkpoints; EMA weights if kept,
        params = obj.get("params_ema") or obj["params"]  # like the final safetensors
        return params, obj.get("config")
    for key in ("params_ema", "params", "state_dict"):  # BasicSR-style files
        if key in obj and isinstance(obj[key], dict):
            return obj[key], None
    return obj, None


def load(path, map_location="cpu", backend: str = "auto", **options) -> SSIU:
    """Load SSIU weights from ours (safetensors or a training checkpoint) or the authors' files.

    Infers scale and sizes from the weights. `options` override config fields that the
    weights cannot tell (attn_topk, moe_topk). Raises CheckpointError naming any
    missing, unexpected or mis-shaped key; the model is returned only if all loaded.
    """
    path = Path(os.fspath(path))
    state, config_dict = _read_file(path, map_location)
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: no parameters found")
    state = _strip_prefix(state)
    authors = _is_authors(state)
    if config_dict is not None:
        config = SSIUConfig.from_dict({**config_dict, **options})
    else:
        config = infer_config(state, authors, **options)
    their_names, known = None, ((), ())
    if authors:
        state, *known = _convert_authors(state, config)
        their_names = {ours: theirs for ours, (theirs, _) in authors_key_map(config).items()}
    model = SSIU(config)
    _load_into(model, state, their_names, tuple(known))
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.set_backend(backend).eval()


def save(model: SSIU, path) -> None:
    """Write the weights as safetensors with the config in the metadata."""
    from safetensors.torch import save_file

    path = Path(os.fspath(path))
    if not path.parent.exists():
        raise FileNotFoundError(f"output directory does not exist: {path.parent}")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": FORMAT, "ssiu_config": model.config.to_json()})


def to_authors_state_dict(model: SSIU) -> dict:
    """Our weights in the authors' names and shapes, prefixed `module.` as in their files."""
    own = model.state_dict()
    out = {}
    for ours, (theirs, shape) in authors_key_map(model.config).items():
        tensor = own[ours]
        out[f"module.{theirs}"] = tensor.reshape(shape) if shape is not None else tensor
    return out
