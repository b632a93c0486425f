"""Checkpoint layouts and strict loading, against golden/checkpoint_keys.json."""
from __future__ import annotations

import json

import pytest
import torch

from models.checkpoint import (build_network, from_upstream, infer_backbone, load_network_state,
                               read_checkpoint, save_checkpoint, to_upstream)
from models.network import GFRTM

from conftest import GOLDEN


@pytest.fixture(scope="module")
def released_keys() -> dict:
    return json.loads((GOLDEN / "checkpoint_keys.json").read_text())


def released_checkpoint(keys: dict, backbone: str) -> dict:
    """A checkpoint in the released upstream layout, random values of the listed shapes."""
    g = torch.Generator().manual_seed(0)
    model = {}
    for k, shape in keys[backbone].items():
        model[k] = torch.randint(0, 5, shape, generator=g) if k.endswith("num_batches_tracked") \
            else torch.rand(shape, generator=g) + (1.0 if k.endswith("running_var") else 0.0)
    return {"model": model}


@pytest.mark.parametrize("backbone", ["resnet18", "resnet101"])
def test_our_network_has_exactly_the_released_keys(released_keys, backbone):
    ours = to_upstream(GFRTM(backbone).state_dict())
    expected = released_keys[backbone]
    assert sorted(ours) == sorted(expected)
    assert {k: list(v.shape) for k, v in ours.items()} == expected


@pytest.mark.parametrize("backbone", ["resnet18", "resnet101"])
def test_released_checkpoint_loads_and_infers_backbone(released_keys, backbone, tmp_path):
    ckpt = released_checkpoint(released_keys, backbone)
    path = tmp_path / "gfrtm.pth"
    torch.save(ckpt, path)
    net, _ = build_network(path)
    assert net.backbone_name == backbone and net.has_gate
    back = to_upstream(net.state_dict())
    for k, v in ckpt["model"].items():
        assert torch.equal(back[k], v), k


def test_frtm_checkpoint_runs_without_gate(released_keys):
    ckpt = released_checkpoint(released_keys, "resnet18")
    frtm = {"model": {k: v for k, v in ckpt["model"].items()
                      if k.startswith("refiner.") and not k.startswith("refiner.Diff_process.")}}
    net, _ = build_network(frtm)
    assert not net.has_gate
    assert not hasattr(net, "reuse_gate") and not hasattr(net, "template_matching")


def test_missing_and_unexpected_keys_are_named(released_keys):
    ckpt = released_checkpoint(released_keys, "resnet18")
    del ckpt["model"]["convGS.4.bias"]
    with pytest.raises(KeyError, match=r"reuse_gate\.conv2\.bias"):
        build_network(ckpt)
    ckpt = released_checkpoint(released_keys, "resnet18")
    ckpt["model"]["refiner.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="extra"):
        build_network(ckpt)
    ckpt = released_checkpoint(released_keys, "resnet18")
    ckpt["model"]["mystery.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="mystery.weight"):
        build_network(ckpt)


def test_backbone_mismatch_with_ftext_is_an_error(released_keys):
    ckpt = released_checkpoint(released_keys, "resnet101")
    with pytest.raises(ValueError, match="resnet101.*--ftext is resnet18"):
        build_network(ckpt, expected_backbone="resnet18")
    assert infer_backbone(ckpt["model"]) == "resnet101"


def test_wrong_shapes_are_named():
    net18 = GFRTM("resnet18")
    state = GFRTM("resnet18").state_dict()
    state["decoder.TSE.layer2.reduce.0.weight"] = torch.zeros(64, 65, 1, 1)
    with pytest.raises(ValueError, match="decoder.TSE.layer2.reduce.0.weight"):
        load_network_state(net18, state)


def test_own_format_round_trip_and_atomic_write(tmp_path):
    torch.manual_seed(1)
    net = GFRTM("resnet18")
    path = save_checkpoint(tmp_path / "ckpt.pth", net, epoch=3)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temporary file left behind
    loaded, ckpt = build_network(path)
    assert ckpt["epoch"] == 3 and ckpt["format"] == "reuse-vos"
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    # Our keys convert to upstream and back unchanged.
    assert from_upstream(to_upstream(net.state_dict())).keys() == net.state_dict().keys()


def test_unreadable_or_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        read_checkpoint(tmp_path / "nothere.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth"):
        read_checkpoint(bad)
    torch.save({"weights": {}}, tmp_path / "nomodel.pth")
    with pytest.raises(ValueError, match="no 'model' entry"):
        read_checkpoint(tmp_path / "nomodel.pth")
