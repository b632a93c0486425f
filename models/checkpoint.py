"""Checkpoint loading and saving in one place.

Three layouts load the same way (strict: missing or unexpected keys raise and are named):
* released G-FRTM checkpoints: `{"model": state_dict}` with upstream keys (`refiner.*`,
  `convGS.*`, `Tmatching.*`, `Convert_Diff.*`);
* FRTM checkpoints: `{"model": ...}` with `refiner.*` only (no `refiner.Diff_process`): run as
  plain FRTM, the reuse gate off;
* our own: `{"format": "reuse-vos", "model": state_dict in our names, "backbone": ..., ...}`,
  possibly with optimizer, scheduler, epoch and args (training checkpoints).
The backbone follows from the weights (`refiner.TSE.layer4.reduce.0.weight` has 256 or 1024
input channels). Files are read by lib.safe_load, which runs no code from them; of upstream's
trainer checkpoints (name, epoch, stats, model, optimizer, scheduler) only `model` is used.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np
import torch

from lib.errors import UsageError
from lib.fileio import atomic_save
from lib.safe_load import load_pth

from .network import BACKBONE_CHANNELS, GFRTM

FORMAT = "reuse-vos"

# Our module names (paper vocabulary) -> upstream checkpoint prefixes. The only place upstream
# names appear. Longest prefixes are matched first.
UPSTREAM_PREFIXES: tuple[tuple[str, str], ...] = (
    ("template_matching.template_value.", "Tmatching.Tgenerate.conv_val."),
    ("template_matching.template_key.", "Tmatching.Tgenerate.conv_key."),
    ("template_matching.key.", "Tmatching.Tmatching.conv_key."),
    ("template_matching.feature.", "Tmatching.Tmatching.conv_feat."),
    ("template_matching.blend.", "Tmatching.Tmatching.blend."),
    ("reuse_gate.conv1.", "convGS.1."),
    ("reuse_gate.norm.", "convGS.2."),
    ("reuse_gate.conv2.", "convGS.4."),
    ("delta_generator.conv.", "Convert_Diff."),
    ("refine_translator.multi_receptive.dilation1.", "refiner.Diff_process.conv_multi.conv1."),
    ("refine_translator.multi_receptive.dilation2.", "refiner.Diff_process.conv_multi.conv2."),
    ("refine_translator.multi_receptive.dilation3.", "refiner.Diff_process.conv_multi.conv3."),
    ("refine_translator.multi_receptive.blend.", "refiner.Diff_process.conv_multi.convBlend."),
    ("refine_translator.residual.", "refiner.Diff_process.postRBB."),
    ("upsampler.", "refiner.project."),
    ("decoder.", "refiner."),
)

# Parts only G-FRTM has; an FRTM network lacks them.
GATE_MODULES = ("template_matching", "reuse_gate", "delta_generator", "refine_translator")

StateDict = Mapping[str, torch.Tensor]
CheckpointSource = Union[str, os.PathLike, Mapping[str, Any]]


def _rename(key: str, table) -> str | None:
    for src, dst in sorted(table, key=lambda p: -len(p[0])):
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def from_upstream(state: StateDict) -> dict[str, torch.Tensor]:
    """Upstream keys -> our keys; a key no table entry knows raises, naming it."""
    table = [(up, ours) for ours, up in UPSTREAM_PREFIXES]
    out, unknown = {}, []
    for k, v in state.items():
        new = _rename(k, table)
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    if unknown:
        raise KeyError(f"unexpected keys in upstream checkpoint: {unknown[:10]}"
                       + (f" (+{len(unknown) - 10} more)" if len(unknown) > 10 else ""))
    return out


def to_upstream(state: StateDict) -> dict[str, torch.Tensor]:
    """Our keys -> upstream keys (for exporting checkpoints upstream code can read)."""
    out = {}
    for k, v in state.items():
        new = _rename(k, UPSTREAM_PREFIXES)
        if new is None:
            raise KeyError(f"no upstream name for key {k!r}")
        out[new] = v
    return out


def _is_upstream_layout(state: StateDict) -> bool:
    return any(k.startswith("refiner.") for k in state)


def infer_backbone(state: StateDict) -> str:
    """The backbone a state dict (either layout) was trained with."""
    for key in ("decoder.TSE.layer4.reduce.0.weight", "refiner.TSE.layer4.reduce.0.weight"):
        if key in state:
            channels = state[key].shape[1]
            for name, ch in BACKBONE_CHANNELS.items():
                if ch["layer4"] == channels:
                    return name
            raise UsageError(f"{key} has {channels} input channels: no known backbone (256 = resnet18, "
                             f"1024 = resnet101)")
    raise KeyError("not a G-FRTM/FRTM checkpoint: no decoder.TSE.layer4.reduce.0.weight "
                   "(or refiner.TSE.layer4.reduce.0.weight) key")


def read_checkpoint(source: CheckpointSource) -> dict[str, Any]:
    """Load a checkpoint file without running code from it (lib.safe_load), or take a loaded
    dict. Raises FileNotFoundError, or ValueError (UsageError) for an unreadable file, a pickle
    that would call code, or a file without a `model` entry."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (--model / --models-dir / --initPth)")
    ckpt = load_pth(path, what="checkpoint")  # runs no code from the file
    if not isinstance(ckpt, Mapping) or "model" not in ckpt:
        raise UsageError(f"checkpoint {path} has no 'model' entry: expected a G-FRTM or FRTM .pth file")
    return dict(ckpt)


def network_state(ckpt: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], str, bool]:
    """Our-layout network state dict of a checkpoint, its backbone, and whether it has the gate."""
    state = ckpt["model"] if "model" in ckpt else ckpt
    if _is_upstream_layout(state):
        state = from_upstream(state)
    state = dict(state)
    backbone = ckpt.get("backbone") or infer_backbone(state)
    has_gate = any(k.split(".")[0] in GATE_MODULES for k in state)
    return state, backbone, has_gate


def check_backbone(backbone: str, ftext: str | None, checkpoint: str) -> None:
    """UsageError when --ftext (`ftext`, None: not given) differs from `backbone`, the backbone
    the checkpoint (described by `checkpoint`, e.g. "--initPth x.pth") was trained with."""
    if ftext is not None and ftext != backbone:
        raise UsageError(f"{checkpoint} was trained with {backbone}, but --ftext is {ftext}: pass --ftext "
                         f"{backbone}, or another checkpoint")


def build_network(source: CheckpointSource, expected_backbone: str | None = None) -> tuple[GFRTM, dict[str, Any]]:
    """Network with the checkpoint's weights (strict), and the checkpoint dict.

    An FRTM checkpoint gives a network without the gate parts (`network.has_gate` is False).
    `expected_backbone` (e.g. from --ftext) must agree with the checkpoint.
    """
    ckpt = read_checkpoint(source)
    state, backbone, has_gate = network_state(ckpt)
    check_backbone(backbone, expected_backbone, "the checkpoint")
    net = GFRTM(backbone, with_gate=has_gate)
    load_network_state(net, state)
    return net, ckpt


def load_network_state(net: GFRTM, state: StateDict) -> None:
    """Strict load of our-layout `state` into `net`, naming missing and unexpected keys."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"checkpoint does not match the {net.backbone_name} network: "
                       f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                       f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        raise UsageError("checkpoint shapes do not match the network: "
                         + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in bad[:5]))
    net.load_state_dict(state, strict=True)


def plain(value: Any) -> Any:
    """`value` with only types torch.load(weights_only=True) rebuilds: paths become strings,
    numpy scalars and one-element tensors numbers, Namespaces dicts; containers recursively."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def save_checkpoint(path: Union[str, os.PathLike], net: GFRTM, **extra: Any) -> Path:
    """Write our checkpoint format atomically: model (our names), backbone, and `extra`
    (optimizer, scheduler and grad-scaler state dicts, epoch, args, stats, ...). `extra` is
    stored as `plain` values, so the file loads with torch.load(weights_only=True) too."""
    return atomic_save({"format": FORMAT, "backbone": net.backbone_name, "has_gate": net.has_gate,
                        "model": net.state_dict(), **plain(extra)}, path)
