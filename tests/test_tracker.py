"""Tracker behaviour beyond the golden vectors: batching, thresholds, FRTM checkpoints, objects
entering later, what reuse skips, and backbone-weight handling."""
from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch

from dataset.synthetic import render_sequence
from lib.cli import UsageError
from models import build_tracker
from models.backbone import Backbone
from models.checkpoint import GATE_MODULES, save_checkpoint
from models.network import GFRTM

SIZE = (120, 216)
LATE = 3  # frame where object 3 enters


@pytest.fixture(scope="module")
def clip():
    """8 frames, objects 1 and 2 from frame 0, object 3 from frame LATE."""
    frames, labels = render_sequence([7], 8, SIZE, 3, first_frames=[0, 0, LATE])
    return torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def frames_of(clip, starts=None):
    images, labels = clip
    starts = starts or {0: [1, 2], LATE: [3]}
    for t in range(images.shape[0]):
        new = starts.get(t, [])
        yield images[t], (labels[t] if new else None), new


@pytest.fixture(scope="module")
def checkpoint():
    torch.manual_seed(0)
    net = GFRTM("resnet18").eval()
    # Trained gates are not centred at 0.5; shift this random one so reuse probabilities spread
    # around 0.5 and both paths are taken.
    with torch.no_grad():
        net.reuse_gate.conv2.bias.copy_(torch.tensor([0.0, 0.0]))
    return {"format": "reuse-vos", "backbone": "resnet18", "model": net.state_dict()}


def tracker_for(checkpoint, **kw):
    kw.setdefault("num_aug", 1)
    return build_tracker(checkpoint, backbone_weights="random", seed=0, **kw)


@pytest.fixture(scope="module")
def mixed_threshold(checkpoint, clip):
    """A threshold under which some object-frames reuse and others compute."""
    probs = []
    for r in tracker_for(checkpoint).track(frames_of(clip), threshold=0.999999):
        probs.extend(r.reuse_prob.values())
    return float(np.median(probs))


def test_batched_and_one_by_one_agree(checkpoint, clip, mixed_threshold):
    a = tracker_for(checkpoint, batch_objects=True).run_sequence(frames_of(clip), mixed_threshold)
    b = tracker_for(checkpoint, batch_objects=False).run_sequence(frames_of(clip), mixed_threshold)
    reused = [v for f in a.frames for v in f.reused.values()]
    assert any(reused) and not all(reused), "the threshold must exercise both paths"
    for fa, fb in zip(a.frames, b.frames):
        assert fa.reused == fb.reused
        assert torch.equal(fa.labels, fb.labels)
        assert fa.probabilities.keys() == fb.probabilities.keys()
        for k in fa.probabilities:
            torch.testing.assert_close(fa.probabilities[k], fb.probabilities[k], atol=1e-5, rtol=0)


def test_threshold_one_never_reuses(checkpoint, clip):
    result = tracker_for(checkpoint).run_sequence(frames_of(clip), threshold=1.0)
    assert all(not v for f in result.frames for v in f.reused.values())
    assert sum(len(f.reused) for f in result.frames) == 2 * 7 + (8 - LATE - 1)


def test_frtm_checkpoint_equals_computed_path(checkpoint, clip):
    frtm = {"model": {k: v for k, v in checkpoint["model"].items() if k.split(".")[0] not in GATE_MODULES}}
    a = tracker_for(checkpoint).run_sequence(frames_of(clip), threshold=1.0)
    b = tracker_for(frtm).run_sequence(frames_of(clip), threshold=0.0)  # no gate: threshold unused
    assert not tracker_for(frtm).network.has_gate
    for fa, fb in zip(a.frames, b.frames):
        assert torch.equal(fa.labels, fb.labels)
        for k in fa.probabilities:
            torch.testing.assert_close(fa.probabilities[k], fb.probabilities[k], atol=1e-6, rtol=0)


def test_object_entering_later(checkpoint, clip, mixed_threshold):
    images, labels = clip
    result = tracker_for(checkpoint).run_sequence(frames_of(clip), mixed_threshold)
    assert torch.equal(result.frames[0].labels, labels[0])
    for t, f in enumerate(result.frames[1:], start=1):
        assert (3 in f.reused) == (t > LATE)
        assert set(f.reused) >= {1, 2}
    # On its first frame the new object claims its annotated pixels.
    assert torch.equal(result.frames[LATE].labels == 3, labels[LATE] == 3)


def test_forced_reuse_skips_high_backbone_and_target_model(checkpoint, clip, monkeypatch):
    from models.target_model import TargetModelTable

    tracker = tracker_for(checkpoint)
    calls, applied, updated = [], [], []  # high backbone passes, target-model rows scored, rows updated
    high, scores, update = tracker.regions.steps["backbone.high"], TargetModelTable.scores, TargetModelTable.update
    monkeypatch.setitem(tracker.regions.steps, "backbone.high", lambda x: calls.append(1) or high(x))
    monkeypatch.setattr(tracker.backbone, "high", lambda x: calls.append(1) or high(x))  # object starts
    monkeypatch.setattr(TargetModelTable, "scores",
                        lambda self, rows, *args: applied.extend(rows) or scores(self, rows, *args))
    monkeypatch.setattr(TargetModelTable, "update",
                        lambda self, rows, masks, enough: updated.extend(rows) or update(self, rows, masks, enough))
    starts = {0: [1, 2]}
    result = tracker.run_sequence(frames_of(clip, starts), threshold=-1.0)  # p > -1: always reuse
    assert all(all(f.reused.values()) for f in result.frames[1:])
    # Only the first frame runs the high backbone and the target models (once per object).
    assert calls == [1] and len(applied) == 2 and updated == []
    result = tracker.run_sequence(frames_of(clip, starts), threshold=1.0)
    assert len(calls) == 1 + 8 and len(applied) == 2 + 2 * 8 and len(updated) == 2 * 7


def test_empty_first_mask_is_an_error(checkpoint, clip):
    with pytest.raises(UsageError, match="object 9 starts here but its mask is empty"):
        tracker_for(checkpoint).run_sequence(frames_of(clip, {0: [1, 9]}), 0.7)
    with pytest.raises(ValueError, match="no labels"):
        list(tracker_for(checkpoint).track([(clip[0][0], None, [1])]))


def test_imagenet_weights_unavailable_says_how_to_fix(monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(FileNotFoundError, match="--backbone-weights"):
        Backbone("resnet18", "imagenet")


def test_backbone_weights_from_file_and_seeded_random(tmp_path):
    a = Backbone("resnet18", "random", seed=3)
    b = Backbone("resnet18", "random", seed=3)
    c = Backbone("resnet18", "random", seed=4)
    x = torch.randint(0, 255, (1, 3, 64, 96), dtype=torch.uint8)
    assert torch.equal(a(x)["layer5"], b(x)["layer5"])
    assert not torch.equal(a(x)["layer5"], c(x)["layer5"])
    torch.save(a.resnet.state_dict(), tmp_path / "rn18.pth")
    d = Backbone("resnet18", tmp_path / "rn18.pth")
    assert torch.equal(a(x)["layer5"], d(x)["layer5"])
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        Backbone("resnet18", tmp_path / "missing.pth")


def test_own_checkpoint_file_builds_a_tracker(tmp_path, clip):
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "net.pth", GFRTM("resnet18").eval())
    with pytest.raises(ValueError, match="--ftext"):
        build_tracker(path, ftext="resnet101", backbone_weights="random")
    result = tracker_for(path).run_sequence(frames_of(clip), 0.7)
    assert len(result.frames) == 8 and result.fps > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(checkpoint, clip):
    a = tracker_for(checkpoint).run_sequence(frames_of(clip), 1.0)
    b = tracker_for(checkpoint, device="cuda").run_sequence(frames_of(clip), 1.0)
    for fa, fb in zip(a.frames, b.frames):
        assert (fa.labels != fb.labels).float().mean() < 0.01


def test_backbone_weights_that_do_not_fit_are_a_user_error():
    import torchvision
    state = torchvision.models.resnet18(weights=None).state_dict()
    del state["layer1.0.conv1.weight"]
    with pytest.raises(UsageError, match="layer1.0.conv1.weight.*--backbone-weights"):
        Backbone("resnet18", state)
    with pytest.raises(UsageError, match="--ftext"):
        Backbone("resnet50", "random")


def test_track_many_equals_one_at_a_time(checkpoint, clip, mixed_threshold):
    """Lockstep tracking (B = 2) of three sequences, one shorter, one with a late start, one of
    another size: each sequence's frames in order, gates and labels those of `track` one
    sequence at a time, target-model scores bitwise, logits up to float rounding (the decoder's
    convolutions run on a larger batch)."""
    images, labels = clip
    small = (images[:5, :, :96, :160], labels[:5, :96, :160])
    sequences = {"clip": lambda: frames_of(clip),
                 "short": lambda: frames_of((images[:4].flip(3), labels[:4].flip(2)), {0: [1, 2]}),
                 "small": lambda: frames_of(small, {0: [1], 2: [2]})}
    tracker = tracker_for(checkpoint)
    one = {key: list(tracker.track(make(), mixed_threshold, keep_raw=True)) for key, make in sequences.items()}
    many: dict[str, list] = {}
    for key, result in tracker.track_many(((key, make()) for key, make in sequences.items()), mixed_threshold,
                                          batch=2, keep_raw=True):
        many.setdefault(key, []).append(result)
    assert {key: len(r) for key, r in many.items()} == {key: len(r) for key, r in one.items()}
    reused = [v for r in one.values() for f in r for v in f.reused.values()]
    assert any(reused) and not all(reused), "the threshold must exercise both paths"
    worst = 0.0
    for key in sequences:
        for fa, fb in zip(one[key], many[key]):
            assert fa.reused == fb.reused
            assert torch.equal(fa.labels, fb.labels)
            for k in fa.scores:
                assert torch.equal(fa.scores[k], fb.scores[k])
                worst = max(worst, (fa.logits[k] - fb.logits[k]).abs().max().item())
    print("largest logit difference", worst)
    assert worst < 1e-5


def test_target_model_tables_live_while_their_objects_do(checkpoint, clip):
    """A finished sequence hands its target models' rows back; a table without objects is dropped
    (a data set of many frame sizes would otherwise keep one memory table per size)."""
    tracker = tracker_for(checkpoint)
    stream = tracker.track(frames_of(clip, {0: [1, 2]}), threshold=0.7)
    next(stream)
    (table,) = tracker.tables.values()
    assert table.capacity - len(table.free) == 2
    list(stream)
    assert tracker.tables == {} and sorted(table.free) == list(range(table.capacity))
