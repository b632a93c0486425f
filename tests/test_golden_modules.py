"""Conformance: every `*_modules.pt` in $RVOS_GOLDEN reproduced module by module.

Tolerances from golden/README.md: atol 1e-4, rtol 1e-3; target model: atol 1e-3.
"""
from __future__ import annotations

import pytest
import torch

from lib.safe_load import load_pth
from models.checkpoint import from_upstream, load_network_state
from models.network import GFRTM
from models.target_model import TargetModel, TargetModelConfig

from conftest import GOLDEN

CASES = sorted(GOLDEN.glob("*_modules.pt")) if GOLDEN.is_dir() else []
ATOL, RTOL = 1e-4, 1e-3


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL, rtol: float = RTOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def case(request):
    return load_pth(request.param)


def test_golden_files_exist():
    assert CASES, f"no *_modules.pt in {GOLDEN}"


def network_from_case(case) -> GFRTM:
    """Assemble the upstream-layout state dict the vectors use and load it through our key map."""
    upstream = {}
    upstream.update({f"Tmatching.{k}": v for k, v in case["template"]["state_dict"].items()})
    upstream.update({f"convGS.{k}": v for k, v in case["gate"]["convGS"].items()})
    upstream.update({f"Convert_Diff.{k}": v for k, v in case["gate"]["Convert_Diff"].items()})
    upstream.update({f"refiner.{k}": v for k, v in case["seg_network"]["state_dict"].items()})
    net = GFRTM(case["ftext"])
    load_network_state(net, from_upstream(upstream))
    return net.eval()


@torch.no_grad()
def test_template_matching(case):
    net = network_from_case(case)
    t = case["template"]
    layer3 = case["features"]["layer3"]
    template = net.make_template(layer3, t["mask8"])
    close(template, t["template"])
    close(net.match(layer3, t["score8"], t["template"]), t["matched"])


@torch.no_grad()
def test_reuse_gate_and_delta(case):
    net = network_from_case(case)
    g = case["gate"]
    logits = net.gate_logits(g["input"])
    close(logits, g["logits"])
    close(torch.softmax(logits, dim=1)[:, 0], g["reuse_prob"])
    close(net.delta(g["input"]), g["diff"])


@torch.no_grad()
def test_decoder_paths(case):
    net = network_from_case(case)
    s = case["seg_network"]
    feats = case["features"]
    size = case["image_size"]
    x16 = net.deep_stages(feats, s["score16"])
    close(x16, s["init_x"])
    logits, state = net.decode_computed(feats, s["score16"], size)
    close(logits, s["computed_y"])
    close(state, s["computed_prevX"])
    diff = case["gate"]["diff"]
    shallow_only = {k: feats[k] for k in ("layer3", "layer2")}
    logits, state = net.decode_reused(shallow_only, s["score16"] + diff, s["init_x"], diff, size)
    close(logits, s["reused_y"])
    close(state, s["reused_prevX"])  # the state carried on: unchanged when reusing, not the translated one


def test_decoder_training_path(case):
    net = network_from_case(case)
    s = case["seg_network"]
    feats = {k: v.expand(2, -1, -1, -1) for k, v in case["features"].items()}
    with torch.no_grad():
        logits, next_x16 = net.decode_training(feats, s["train_scores"], s["train_mixed_scores"], s["train_gate"],
                                               s["train_prevX"], s["train_diff"], case["image_size"])
    close(logits, s["train_y"])
    close(next_x16, s["train_new_prevX"])


def test_target_model(case):
    tm = case["target_model"]
    p = tm["params"]
    config = TargetModelConfig(
        channels=p["c_channels"], init_iters=tuple(p["init_iters"]), update_iters=tuple(p["update_iters"]),
        memory_size=p["memory_size"], train_skipping=p["train_skipping"], learning_rate=p["learning_rate"],
        filter_reg=tuple(p["filter_reg"]), precond=tuple(p["precond"]), precond_lr=p["precond_lr"],
        cg_forgetting_rate=p["CG_forgetting_rate"],
        pixel_weighting=(p["pixel_weighting"] or {"method": "none"})["method"],
        target_fraction=(p["pixel_weighting"] or {"tf": 0.1}).get("tf", 0.1))
    model = TargetModel(p["in_channels"], config)
    model.load_trained(tm["initial_state_dict"])
    model.initialize(tm["init_features"], tm["init_labels"])
    for k, v in tm["state_dict_after_init"].items():
        close(model.state_dict()[k], v, atol=1e-3)
    for i, frame in enumerate(tm["frames"]):
        scores = model.apply(frame["feature"])
        close(scores, frame["scores"], atol=1e-3)
        model.update(frame["update_mask"])
    for k, v in tm["state_dict_after_frames"].items():
        close(model.state_dict()[k], v, atol=1e-3)
