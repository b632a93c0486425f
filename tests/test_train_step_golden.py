"""Conformance: every `*_train_step.pt` in $RVOS_GOLDEN (one training batch):
per-frame average losses and accuracy, gradients of the summed losses for every learnable
parameter, and batch-norm running statistics after the step (atol 1e-4, rtol 1e-3)."""
from __future__ import annotations

import pytest
import torch

from lib.safe_load import load_pth
from models.backbone import Backbone
from models.checkpoint import from_upstream, load_network_state, to_upstream
from models.network import GFRTM
from models.target_model import TargetModel, TargetModelConfig
from trainers.gfrtm_step import GateLossConfig, GFRTMStep

from conftest import GOLDEN
from conftest import seeded_backbone_state

CASES = sorted(GOLDEN.glob("*_train_step.pt")) if GOLDEN.is_dir() else []
ATOL, RTOL = 1e-4, 1e-3


def test_golden_files_exist():
    assert CASES, f"no *_train_step.pt in {GOLDEN}"


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def step_result(request):
    case = load_pth(request.param)
    backbone = Backbone(case["ftext"], seeded_backbone_state(case["ftext"], case["backbone_seed"],
                                                             case["backbone_checksum"]))
    net = GFRTM(case["ftext"])
    load_network_state(net, from_upstream(case["learnable_state_dict"]))
    net.train()
    targets = []
    for sd in case["target_model_state_dicts"]:
        tm = TargetModel(sd["project.weight"].shape[1], TargetModelConfig.training())
        tm.load_trained(sd)
        targets.append(tm)
    step = GFRTMStep(net, backbone, GateLossConfig(m1=case["m1"], m2=case["m2"], margin_epochs=case["margin_epochs"]))
    images = [im.float() for im in case["images"]]
    labels = [lb.float() for lb in case["labels"]]
    loss, stats = step.loss(images, labels, targets, case["epoch"])
    loss.backward()
    grads = to_upstream({k: p.grad for k, p in net.named_parameters()})
    buffers = to_upstream({k: b for k, b in net.named_buffers()})
    return case, stats, grads, buffers


def test_losses_and_accuracy(step_result):
    case, stats, _, _ = step_result
    for key in ("loss_seg", "loss_diff", "loss_gp", "accuracy"):
        assert stats[key] == pytest.approx(case["stats"][f"stats/{key}"], rel=RTOL, abs=ATOL), key


def test_gradients(step_result):
    case, _, grads, _ = step_result
    assert sorted(grads) == sorted(case["grads"])
    for k, expected in case["grads"].items():
        assert grads[k] is not None, k
        torch.testing.assert_close(grads[k], expected, atol=ATOL, rtol=RTOL, msg=k)


def test_batch_norm_statistics(step_result):
    case, _, _, buffers = step_result
    for k, expected in case["buffers_after"].items():
        torch.testing.assert_close(buffers[k], expected, atol=ATOL, rtol=RTOL, msg=k)
