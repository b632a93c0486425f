"""Reading .pth files runs no code from them (lib.safe_load): upstream trainer checkpoints, whose
`stats` hold a class of a module this project lacks, load and track as their `model` alone;
pickles that call os.system, exec or subprocess are refused with one error line; our own
checkpoints hold plain types only."""
from __future__ import annotations

import io
import pickle
import time
from collections import defaultdict

import numpy as np
import pytest
import torch

from lib import safe_load
from lib.cli import UsageError
from lib.safe_load import Placeholder, UnsafePickleError, load_pth
from models import build_tracker
from models.checkpoint import read_checkpoint, save_checkpoint
from models.network import GFRTM
from dataset.synthetic import render_sequence

from forged_checkpoints import PAYLOADS, malicious_checkpoint, upstream_trainer_checkpoint

SIZE = (64, 96)


@pytest.fixture(scope="module")
def clip():
    frames, labels = render_sequence([5], 4, SIZE, 2, first_frames=[0, 2])
    return torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def labels_of(checkpoint, clip) -> list[torch.Tensor]:
    images, labels = clip
    starts = {0: [1], 2: [2]}
    frames = [(images[t], labels[t] if t in starts else None, starts.get(t, [])) for t in range(len(images))]
    tracker = build_tracker(checkpoint, backbone_weights="random", num_aug=1, seed=0)
    return [r.labels for r in tracker.track(frames, threshold=0.5)]


@pytest.mark.parametrize("layout", ["gfrtm", "frtm", "gfrtm-legacy-format"])
def test_upstream_trainer_checkpoint_loads_and_tracks_as_its_model(layout, clip, tmp_path):
    torch.manual_seed(1)
    net = GFRTM("resnet18", with_gate=layout != "frtm").eval()
    path = upstream_trainer_checkpoint(net, tmp_path / "upstream.pth", legacy_format=layout.endswith("legacy-format"))
    with pytest.raises(ModuleNotFoundError, match="lib.utils"):  # as torch.load reads it
        torch.load(path, weights_only=False)
    ckpt = read_checkpoint(path)
    assert ckpt["name"] == "upstream_run" and ckpt["epoch"] == 160
    assert set(ckpt["optimizer"]) == {"state", "param_groups"} and ckpt["scheduler"]["step_size"] == 127
    stats = ckpt["stats"]
    assert isinstance(stats, defaultdict)
    loss = stats["stats/loss"]
    assert isinstance(loss, Placeholder) and loss.placeholder_of == "lib.utils.AverageMeter"
    assert loss.count == 2 and float(loss.avg) == pytest.approx(0.5)  # the stored state is kept
    alone = tmp_path / "model_alone.pth"
    torch.save({"model": ckpt["model"]}, alone)
    got, want = labels_of(path, clip), labels_of(alone, clip)
    assert len(got) == len(want) == 4
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert build_tracker(path, backbone_weights="random", num_aug=1).network.has_gate == (layout != "frtm")


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("legacy_format", [False, True])
def test_malicious_pickles_are_refused_and_run_nothing(payload, legacy_format, tmp_path):
    marker = tmp_path / "MARKER"
    path = malicious_checkpoint(tmp_path / "evil.pth", payload, marker, legacy_format=legacy_format)
    with pytest.raises(UnsafePickleError) as err:
        read_checkpoint(path)
    assert not marker.exists()
    named = {"os.system": "posix.system", "builtins.exec": "builtins.exec", "subprocess.Popen": "subprocess.Popen"}
    assert f"checkpoint {path} was not loaded: it would call {named[payload]}," in str(err.value)
    assert isinstance(err.value, UsageError)  # one `error:` line from the scripts
    torch.load(path, weights_only=False)  # the file is real: plain pickle runs the payload
    for _ in range(100):  # Popen returns before `touch` has run
        if marker.exists():
            break
        time.sleep(0.05)
    assert marker.exists()


def _pickle_naming(module: str, name: str, reduce_args=None) -> bytes:
    """A protocol-2 pickle whose one global is `module.name`, called with `reduce_args`."""
    op = b"c" + module.encode() + b"\n" + name.encode() + b"\n"
    if reduce_args is None:
        return b"\x80\x02" + op + b"."
    return b"\x80\x02" + op + pickle.dumps(reduce_args, protocol=2)[2:-1] + b"R."


@pytest.mark.parametrize("module,name", [("posix", "system"), ("builtins", "getattr"), ("importlib", "import_module"),
                                         ("torch.hub", "load"), ("numpy", "load"), ("shutil", "rmtree"),
                                         ("runpy", "run_path"), ("evilpkg.tools", "run_command")])
def test_globals_that_are_code_are_refused(module, name):
    with pytest.raises(UnsafePickleError, match=f"{module}.{name}"):
        safe_load.load(io.BytesIO(_pickle_naming(module, name, ("touch MARKER",))))


def test_unknown_classes_become_inert_placeholders():
    obj = safe_load.load(io.BytesIO(_pickle_naming("somelab.loggers", "Logger", ("runs/x", 3))))
    assert isinstance(obj, Placeholder) and obj.placeholder_of == "somelab.loggers.Logger"
    assert obj.placeholder_args == ("runs/x", 3)
    # Data types come back as themselves.
    data = {"a": np.arange(3.0), "b": np.float32(1.5), "c": {1, 2}, "d": b"xy", "e": torch.ones(2, dtype=torch.half),
            "f": torch.nn.Parameter(torch.zeros(1)), "g": torch.Size([2, 3]), "h": torch.device("cpu")}
    buf = io.BytesIO()
    torch.save(data, buf)
    buf.seek(0)
    path_free = torch.load(buf, weights_only=False, pickle_module=safe_load)
    assert np.array_equal(path_free["a"], data["a"]) and path_free["b"] == np.float32(1.5)
    assert path_free["c"] == {1, 2} and path_free["d"] == b"xy" and path_free["e"].dtype == torch.half
    assert isinstance(path_free["f"], torch.nn.Parameter) and path_free["g"] == torch.Size([2, 3])


def test_truncated_file_keeps_the_download_message(tmp_path):
    torch.manual_seed(0)
    good = save_checkpoint(tmp_path / "good.pth", GFRTM("resnet18"))
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(UsageError, match="cut.pth could not be read.*is the download complete"):
        read_checkpoint(cut)


def test_own_checkpoints_hold_plain_types(tmp_path):
    import argparse
    from pathlib import Path
    torch.manual_seed(0)
    net = GFRTM("resnet18")
    args = argparse.Namespace(checkpoints=Path("/tmp/ck"), size=(120, 216), lr=1e-3)
    path = save_checkpoint(tmp_path / "ours.pth", net, epoch=2, args=args, stats={"loss": np.float64(0.5)})
    ckpt = torch.load(path, weights_only=True)  # raises for any non-plain type
    assert ckpt["args"] == {"checkpoints": "/tmp/ck", "size": (120, 216), "lr": 1e-3}
    assert ckpt["stats"] == {"loss": 0.5} and type(ckpt["stats"]["loss"]) is float
    assert ckpt["epoch"] == 2 and read_checkpoint(path)["args"] == ckpt["args"]
