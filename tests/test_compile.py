"""Compiled frame regions (models.compiled, --compile): every region compiles as one graph, and
an inductor-compiled tracker tracks like the eager one (same gates and labels, probabilities
within the golden tolerance)."""
import re

import pytest
import torch

from benchmarks.tracker_speed import make_frames, random_tracker
from models.compiled import RECOMPILE_LIMIT, cache_dir

REGIONS = {"backbone.low", "backbone.high", "match", "gate_logits", "delta", "decode_computed", "decode_reused",
           "target_score", "target_optimizer", "merge_probabilities"}


@pytest.fixture(scope="module")
def mixed():
    """(frames, threshold, eager results): 1 object, 4 frames at 64x96, the seeded random gate's
    own decisions at a threshold between its probabilities, so both decoder paths run."""
    frames = make_frames(1, 4, (64, 96), seed=3)
    computing = list(random_tracker("resnet18", "cpu").track(frames, threshold=0.999999))
    p = sorted(r.reuse_prob[1] for r in computing[1:])
    threshold = max((b - a, (a + b) / 2) for a, b in zip(p, p[1:]))[1]  # in the widest gap
    eager = list(random_tracker("resnet18", "cpu").track(frames, threshold=threshold))
    assert {r.reused[1] for r in eager[1:]} == {False, True}
    margins = [abs(r.reuse_prob[1] - threshold) for r in eager[1:]]
    assert min(margins) > 1e-4, f"gate probabilities {[r.reuse_prob for r in eager]} too close to {threshold}"
    return frames, threshold, eager


def assert_tracks_alike(got, want, probability_tol: dict) -> None:
    for t, (g, w) in enumerate(zip(got, want)):
        assert g.reused == w.reused, f"frame {t}"
        for i in w.reuse_prob:
            assert abs(g.reuse_prob[i] - w.reuse_prob[i]) < 1e-5, f"frame {t}"
        assert torch.equal(g.labels, w.labels), f"frame {t}"
        for i in w.probabilities:
            torch.testing.assert_close(g.probabilities[i], w.probabilities[i], **probability_tol)


def test_every_region_compiles_whole_with_aot_eager(mixed, capsys):
    """fullgraph=True: a graph break would raise. A second frame size compiles anew (the
    recompile limit is raised, so it does not fall back to eager)."""
    import torch._dynamo.config

    frames, threshold, eager = mixed
    tracker = random_tracker("resnet18", "cpu", compile="aot_eager")
    assert_tracks_alike(list(tracker.track(frames, threshold)), eager, dict(atol=1e-5, rtol=0))
    assert set(tracker.regions.compiled_shapes) == REGIONS
    assert "--compile:" in capsys.readouterr().err  # the compile time, on stderr
    assert tracker.regions.compiled_shapes["backbone.low"] == 1
    list(tracker.track(make_frames(1, 2, (96, 64)), threshold))
    assert tracker.regions.compiled_shapes["backbone.low"] == 2
    assert torch._dynamo.config.recompile_limit == RECOMPILE_LIMIT
    # In lockstep the regions take two frames' objects at once (an index picks each one's frame).
    other = make_frames(2, 4, (64, 96), seed=4)
    want = {1: list(random_tracker("resnet18", "cpu").track(other, threshold))}
    many: dict = {}
    for key, result in tracker.track_many([(0, frames), (1, other)], threshold, batch=2):
        many.setdefault(key, []).append(result)
    assert_tracks_alike(many[0], eager, dict(atol=1e-5, rtol=0))
    assert_tracks_alike(many[1], want[1], dict(atol=1e-5, rtol=0))


def test_compiled_regions_take_power_of_two_batches(mixed):
    """Compiled with row buckets (CUDA's default), a batch of 3 objects runs the network's regions
    as 4 (the last object repeated, its outputs discarded): each region compiles for few batch
    sizes. Same tracking as eager."""
    _, threshold, _ = mixed
    frames = make_frames(3, 3, (64, 96), seed=5)
    tracker = random_tracker("resnet18", "cpu", compile="aot_eager")
    assert not tracker.regions.row_buckets  # on the CPU only when asked for (CUDA: always)
    tracker.regions.row_buckets = True
    batches, match = [], tracker.regions.steps["match"]
    tracker.regions.steps["match"] = lambda layer3, prev, *args: batches.append(prev.shape[0]) or match(layer3, prev, *args)
    got = list(tracker.track(frames, threshold))
    assert batches == [4, 4]
    assert_tracks_alike(got, list(random_tracker("resnet18", "cpu").track(frames, threshold)), dict(atol=1e-5, rtol=0))


def test_compiled_target_models_keep_their_state_buffers(mixed):
    """With --compile the target models' state (weights, memories, optimizer state) lives in the
    table's buffers from frame to frame, re-optimised on every computed frame here; only the
    compiled regions' outputs are new tensors."""
    import dataclasses

    frames, threshold, _ = mixed
    tracker = random_tracker("resnet18", "cpu", compile="aot_eager")
    tracker.target_config = dataclasses.replace(tracker.target_config, train_skipping=1, min_update_pixels=0)
    stream = tracker.track(frames, threshold=1.0)  # every frame computed
    next(stream)
    (table,) = tracker.tables.values()
    assert table.optimizer_fn == tracker.regions.optimize_filters and table.static_shapes
    runs, compiled = [], table.optimizer_fn
    table.optimizer_fn = lambda *args: runs.append(1) or compiled(*args)
    state = ("theta", "samples", "metrics", "targets", "current", "direction", "rho", "residual")
    pointers = {name: getattr(table, name).data_ptr() for name in state}
    list(stream)
    assert len(runs) == len(frames) - 1
    assert {name: getattr(table, name).data_ptr() for name in state} == pointers


def test_inductor_tracks_like_eager(mixed, tmp_path_factory):
    """The one inductor run. Its compiled code is cached in models.compiled.cache_dir()
    ($TORCHINDUCTOR_CACHE_DIR, here the tests' temporary cache: conftest.py): minutes cold, well
    under one warm."""
    frames, threshold, eager = mixed
    tracker = random_tracker("resnet18", "cpu", compile=True)
    assert_tracks_alike(list(tracker.track(frames, threshold)), eager, dict(atol=1e-4, rtol=1e-3))  # golden tolerance
    assert set(tracker.regions.compiled_shapes) == REGIONS
    assert cache_dir().is_dir() and tmp_path_factory.getbasetemp().parent in cache_dir().parents


def test_tracker_speed_puts_compiled_beside_eager(cheap_compile, capsys):
    """benchmarks.tracker_speed --compile: computed and reused, eager and compiled, the speed-up
    and the compiled GFLOP/s as a share of --peak-gflops."""
    from benchmarks import tracker_speed
    args = tracker_speed.get_parser().parse_args(["--size", "64x96", "--frames", "3", "--repeats", "1",
                                                  "--configs", "resnet18:1", "--compile", "--peak-gflops", "1000"])
    m = tracker_speed.main(args)[("resnet18", 1, "fp32")]
    assert cheap_compile == ["inductor", "inductor"]  # computed and reused compiled trackers
    out = capsys.readouterr().out
    assert "peak 1000 GFLOP/s (--peak-gflops)" in out
    for name in ("computed", "reused"):
        row = re.search(rf"^resnet18 +1 +{name} +(\d+) +(\d+) +([\d.]+)x +([\d.]+) +([\d.]+) +([\d.]+)%$", out, re.M)
        assert row, out
        compiled = m[f"{name} compiled"]
        rate = compiled["gflops"] / compiled["ms"] * 1000
        assert float(row[5]) == pytest.approx(rate, abs=0.06) and float(row[6]) == pytest.approx(rate / 10, abs=0.06)
        assert float(row[3]) == pytest.approx(m[name]["ms"] / compiled["ms"], abs=0.006)


def test_a_compiler_crash_leaves_that_region_eager(mixed, capsys):
    """A code generator that crashes on a region (as inductor's CPU code generator can) costs
    that region its compilation, said once on stderr, not the run."""
    frames, threshold, eager = mixed

    def crashing(graph, example_inputs):
        if any(t.dim() == 3 and t.shape[-1] == 9 for t in example_inputs if isinstance(t, torch.Tensor)):
            raise KeyError("buf49")  # the target model's score (its filter weights are (N, c, 9))
        return graph.forward

    tracker = random_tracker("resnet18", "cpu", compile=crashing)
    assert_tracks_alike(list(tracker.track(frames, threshold)), eager, dict(atol=1e-5, rtol=0))
    assert set(tracker.regions.failed) == {"target_score"}
    assert capsys.readouterr().err.count("compiling target_score failed") == 1
