"""Checkpoint files as others write them, for the loading tests: upstream's trainer checkpoint
(with `stats = defaultdict(AverageMeter)` from upstream's `lib.utils`, which this project does not
have) and malicious pickles that try to create a marker file when loaded."""
from __future__ import annotations

import builtins
import contextlib
import os
import subprocess
import sys
import types
from collections import defaultdict
from pathlib import Path

import torch

from models.checkpoint import to_upstream
from models.network import GFRTM


@contextlib.contextmanager
def _module_named(name: str, **members):
    """A module `name` holding `members` while the block pickles them (pickle looks classes up by
    module and name), gone again afterwards, as on a machine without upstream's code."""
    module = types.ModuleType(name)
    for key, value in members.items():
        value.__module__ = name
        setattr(module, key, value)
    before = sys.modules.get(name)
    sys.modules[name] = module
    try:
        yield
    finally:
        if before is None:
            del sys.modules[name]
        else:
            sys.modules[name] = before


class AverageMeter:
    """Upstream's running-average statistic (its lib.utils), as its trainer pickles it."""

    def __init__(self):
        self.val = self.avg = self.sum = 0.0
        self.count = 0

    def update(self, val, n=1):
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count


def upstream_trainer_checkpoint(network: GFRTM, path: Path, legacy_format: bool = False) -> Path:
    """`network` saved as upstream's Trainer.save_checkpoint saves: dict(name, epoch, stats, model,
    optimizer, scheduler), model in upstream's key names."""
    model = to_upstream({k: v.clone() for k, v in network.state_dict().items()})
    params = [p.detach().clone().requires_grad_() for p in network.parameters()]  # `network` unchanged
    optimizer = torch.optim.Adam(params, lr=1e-3, amsgrad=True)
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()  # optimizer state with exp_avg etc.
    optimizer.zero_grad(set_to_none=True)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=127, gamma=0.1)
    with _module_named("lib.utils", AverageMeter=AverageMeter):
        stats = defaultdict(AverageMeter)
        stats["stats/loss"].update(0.25)
        stats["stats/loss"].update(torch.tensor(0.75))
        stats["stats/accuracy"].update(0.9)
        ckpt = dict(name="upstream_run", epoch=160, stats=stats, model=model,
                    optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())
        torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy_format)
    return path


PAYLOADS = ("os.system", "builtins.exec", "subprocess.Popen")


def malicious_checkpoint(path: Path, payload: str, marker: Path, legacy_format: bool = False) -> Path:
    """A `.pth` whose pickle calls `payload` (one of PAYLOADS) to create `marker`, beside a valid
    `model` entry; `legacy_format`: torch's pre-1.6 file format."""
    calls = {"os.system": (os.system, (f"touch {marker}",)),
             "builtins.exec": (builtins.exec, (f"open({str(marker)!r}, 'w').close()",)),
             "subprocess.Popen": (subprocess.Popen, (["touch", str(marker)],))}

    class Payload:
        def __reduce__(self):
            return calls[payload]

    torch.manual_seed(0)
    torch.save({"model": GFRTM("resnet18").state_dict(), "extra": Payload()}, path,
               _use_new_zipfile_serialization=not legacy_format)
    return path
