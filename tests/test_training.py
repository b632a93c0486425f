"""Training (docs/training.md) on the CPU with tiny synthetic data and random backbones: the loss goes
down on a fixed batch; checkpoints are complete, atomic, load in the tracker and resume (also
after SIGKILL); torchrun with 2 processes ends with identical weights, rank 0 writing alone;
bad input is reported or skipped; the data set's visibility rules and the gate's pieces."""
from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
from dataset.synthetic import make_davis_like
from dataset.training import (TrainingSamples, build_sources, davis_visibility, epoch_samples,
                              plain_visibility)
from lib.cli import UsageError
from lib.image_io import write_label_png
from models import build_tracker
from models.backbone import Backbone
from models.checkpoint import GATE_MODULES, read_checkpoint, save_checkpoint
from models.network import GFRTM
from trainers.gfrtm_step import GateLossConfig, GFRTMStep, gate_target, straight_through_gate
from trainers.tmcache import TargetModelCache
from trainers.trainer import TrainConfig, Trainer, initial_network, build_optimizer, checkpoint_files, run_training

from conftest import assert_output_error, run_script
from forged_checkpoints import malicious_checkpoint, upstream_trainer_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SIZE = (64, 112)
FRAMES = 3


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    make_davis_like(root, num_sequences=1, num_frames=8, size=SIZE, num_objects=2, seed=0, num_train_sequences=2)
    return root


def cli(tmp_path: Path, synthetic_root: Path, *extra: str) -> list[str]:
    """A tiny CPU training run on the synthetic set: 2 samples of FRAMES frames per epoch."""
    return ["--name", "t", "--dset", "synthetic", "--synthetic-root", str(synthetic_root),
            "--checkpoints", str(tmp_path / "ck"), "--tensorboard", str(tmp_path / "tb"),
            "--tmcache", str(tmp_path / "tm"), "--cache-dir", str(tmp_path / "cache"),
            "--size", f"{SIZE[0]}x{SIZE[1]}", "--frames", str(FRAMES), "--samples-per-epoch", "2",
            "--num-aug", "1", "--backbone-weights", "random", "--dev", "cpu", *extra]


def parse(tmp_path: Path, synthetic_root: Path, *extra: str) -> TrainConfig:
    """The training config of train.py's flags `cli(...)` (as train.py maps them)."""
    args = train.get_parser().parse_args(cli(tmp_path, synthetic_root, "--batch-size", "2", "--workers", "0", *extra))
    return train.config_from_args(args)


# ---------------------------------------------------------------------------------------------
# Training itself


def test_loss_decreases_on_a_fixed_batch(synthetic_root, tmp_path):
    sources = build_sources("synthetic", str(synthetic_root), None, tmp_path / "cache", SIZE, 4)
    data = TrainingSamples(sources, epoch_samples(sources, 0, 1, 4)[:2], SIZE)
    images, labels = (torch.stack(x).float() for x in zip(*[data[i][:2] for i in range(2)]))
    frames = [images[:, t] for t in range(images.shape[1])]
    masks = [labels[:, t] for t in range(labels.shape[1])]
    backbone = Backbone("resnet18", "random", seed=0)
    cache = TargetModelCache(tmp_path / "tm", backbone, torch.device("cpu"), num_aug=1)
    targets = [cache.get(s.sequence, s.frames[0], s.object_id, frames[0][b], masks[0][b])
               for b, s in enumerate(data.specs)]
    args = parse(tmp_path, synthetic_root)
    net = initial_network(args).train()
    step = GFRTMStep(net, backbone, GateLossConfig())
    optimizer, _ = build_optimizer(net, args)
    losses = []
    for _ in range(6):
        loss, stats = step.loss(frames, masks, targets, 1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert set(stats) >= {"loss", "loss_seg", "loss_diff", "loss_gp", "accuracy", "reuse_rate", "margin"}
    assert stats["loss"] == pytest.approx(stats["loss_seg"] + stats["loss_diff"] + stats["loss_gp"])
    assert set(step.visuals) == {"frame", "mask", "prediction", "delta"}
    assert step.visuals["prediction"].shape == (3, 1, *SIZE)


def test_reduced_precision_training(synthetic_root, tmp_path, monkeypatch):
    """bf16: the step under autocast, fp32 weights and optimizer; fp16 (allowed here by pretending
    the CPU has fp16 kernels): a GradScaler whose state the checkpoint keeps; refused where the
    device cannot run it, before any work."""
    stats = run_training(parse(tmp_path / "bf16", synthetic_root, "--epochs", "1", "--precision", "bf16"))
    assert math.isfinite(stats["loss"])
    ckpt = read_checkpoint(tmp_path / "bf16" / "ck" / "t" / "t_ep0001.pth")
    assert {v.dtype for v in ckpt["model"].values() if v.is_floating_point()} == {torch.float32}
    assert "grad_scaler" not in ckpt and ckpt["args"]["precision"] == "bf16"

    from lib import precision
    monkeypatch.setattr(precision, "_cpu_supports_fp16", lambda: True)
    run_training(parse(tmp_path / "fp16", synthetic_root, "--epochs", "1", "--precision", "fp16"))
    ckpt = read_checkpoint(tmp_path / "fp16" / "ck" / "t" / "t_ep0001.pth")
    assert ckpt["grad_scaler"]["scale"] > 0
    monkeypatch.setattr(precision, "_cpu_supports_fp16", lambda: False)
    with pytest.raises(UsageError, match="--precision fp16"):
        run_training(parse(tmp_path / "fp16", synthetic_root, "--epochs", "2", "--precision", "fp16"))


@pytest.fixture(scope="module")
def first_run(synthetic_root, tmp_path_factory):
    """One epoch of run_training, in process."""
    tmp_path = tmp_path_factory.mktemp("run")
    before = torch.random.get_rng_state()
    stats = run_training(parse(tmp_path, synthetic_root, "--epochs", "1"))
    assert torch.equal(torch.random.get_rng_state(), before), "training reseeded the global RNG"
    return tmp_path, stats


def test_epoch_writes_a_complete_checkpoint_logs_and_cache(first_run):
    tmp_path, stats = first_run
    assert {"loss", "loss_seg", "loss_diff", "loss_gp", "accuracy", "reuse_rate", "lr", "margin",
            "cache_hit_rate", "cache_hits", "cache_trained_before_epoch"} <= set(stats)
    path = tmp_path / "ck" / "t" / "t_ep0001.pth"
    assert checkpoint_files(path.parent, "t") == [path]
    ckpt = read_checkpoint(path)
    assert {"model", "optimizer", "scheduler", "epoch", "args", "format", "backbone"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and ckpt["args"]["frames"] == FRAMES
    assert set(torch.load(path, weights_only=True)) == set(ckpt)  # plain types only
    assert isinstance(ckpt["args"]["checkpoints"], str)  # a Path in the config
    assert build_tracker(path, backbone_weights="random", num_aug=1).network.has_gate
    entries = list((tmp_path / "tm" / "resnet18-c32_gTrue").rglob("*.layer4.pth"))
    assert entries and all(e.name.count(".") == 3 for e in entries)  # NNNNN.<object>.layer4.pth
    # A fresh cache: the epoch's target models are trained before the epoch; the batches only read.
    assert stats["cache_trained_before_epoch"] == len(entries) and stats["cache_hit_rate"] == 1.0
    assert list((tmp_path / "tb" / "t").glob("events.out.tfevents.*"))
    assert not list(path.parent.glob(".*.tmp"))


def test_resume_restores_epoch_optimizer_and_scheduler(first_run, synthetic_root, capsys):
    tmp_path, _ = first_run
    saved = read_checkpoint(tmp_path / "ck" / "t" / "t_ep0001.pth")
    args = parse(tmp_path, synthetic_root, "--epochs", "2")
    net = initial_network(args)
    optimizer, scheduler = build_optimizer(net, args)
    trainer = Trainer(GFRTMStep(net, Backbone("resnet18", "random", seed=0), GateLossConfig()), optimizer,
                      scheduler, [], None, args, torch.device("cpu"), tmp_path / "ck" / "t", tmp_path / "tb2")
    trainer.resume()
    assert trainer.epoch == 1
    state = optimizer.state_dict()["state"]
    for k, v in saved["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
            assert torch.equal(state[k][name], v[name]), (k, name)
    assert scheduler.state_dict() == saved["scheduler"]
    assert all(torch.equal(net.state_dict()[k], v) for k, v in saved["model"].items())

    capsys.readouterr()
    run_training(args)  # picks up the newest checkpoint of --name by itself
    assert "continuing with epoch 2" in capsys.readouterr().out
    assert read_checkpoint(tmp_path / "ck" / "t" / "t_ep0002.pth")["epoch"] == 2


def test_sigkill_mid_run_then_resume(synthetic_root, tmp_path):
    ck = tmp_path / "ck" / "t"
    args = cli(tmp_path, synthetic_root, "--batch-size", "1", "--workers", "1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, "--epochs", "50"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not checkpoint_files(ck, "t") and proc.poll() is None:
            time.sleep(0.1)
        assert checkpoint_files(ck, "t"), "no checkpoint appeared"
        time.sleep(0.3)  # into the next epoch (or its checkpoint)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = checkpoint_files(ck, "t")
    for path in done:  # every checkpoint file left is complete
        assert read_checkpoint(path)["epoch"] == int(path.stem.split("_ep")[1])
    epoch = read_checkpoint(done[-1])["epoch"]
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--epochs", str(epoch + 1)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {done[-1]} (epoch {epoch}); continuing with epoch {epoch + 1}" in out.stdout
    assert read_checkpoint(ck / f"t_ep{epoch + 1:04d}.pth")["epoch"] == epoch + 1
    assert not [p for p in ck.iterdir() if p.suffix != ".pth" or p.name.startswith(".")]  # no partial files


def test_torchrun_two_processes(synthetic_root, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "train.py"), *cli(tmp_path, synthetic_root, "--batch-size", "1", "--workers", "0",
                                                       "--epochs", "1")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 process(es)" in out.stdout
    assert "largest difference to rank 0: [0.0, 0.0] -> identical" in out.stdout
    assert out.stdout.count("device: ") == 1  # only rank 0 reports
    assert [p.name for p in (tmp_path / "ck" / "t").iterdir()] == ["t_ep0001.pth"]  # rank 0 only
    assert len(list((tmp_path / "tb" / "t").glob("events.out.tfevents.*"))) == 1


# train.py whose loss is NaN on rank 1 alone.
NAN_ON_RANK_1 = f"""import os, runpy, sys
sys.path.insert(0, {str(ROOT)!r})
from trainers.gfrtm_step import GFRTMStep
loss = GFRTMStep.loss

def nan_loss(self, *args, **kwargs):
    value, stats = loss(self, *args, **kwargs)
    return value * float("nan") if os.environ["RANK"] == "1" else value, stats

GFRTMStep.loss = nan_loss
sys.argv[0] = {str(ROOT / "train.py")!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("fault", ["missing --initPth", "NaN on rank 1"])
def test_torchrun_failure_is_reported_once(synthetic_root, tmp_path, fault):
    """A mistake every process meets (--initPth missing) and a failure on one process (its loss
    is NaN): one `error:` line for the job, from the process that knows, and no checkpoint."""
    script, extra = ROOT / "train.py", ["--initPth", str(tmp_path / "missing.pth")]
    if fault == "NaN on rank 1":
        script, extra = tmp_path / "nan_train.py", []
        script.write_text(NAN_ON_RANK_1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), *cli(tmp_path, synthetic_root, "--batch-size", "1", "--workers", "0",
                                            "--epochs", "1", *extra)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out.stderr[-3000:]
    assert ("missing.pth does not exist" if fault.startswith("missing") else "non-finite loss (nan)") in errors[0]
    assert not checkpoint_files(tmp_path / "ck" / "t", "t")


# train.py whose rank 1 is killed (SIGKILL) at its first loss.
KILL_RANK_1 = f"""import os, runpy, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from trainers.gfrtm_step import GFRTMStep
loss = GFRTMStep.loss

def killed_loss(self, *args, **kwargs):
    if os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return loss(self, *args, **kwargs)

GFRTMStep.loss = killed_loss
sys.argv[0] = {str(ROOT / "train.py")!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_torchrun_rank_killed_mid_epoch_is_one_line(synthetic_root, tmp_path):
    """A process SIGKILLed mid-epoch: the survivor's gradient all-reduce fails (gloo: connection
    closed by peer), which is one `error:` line, not a traceback. torchrun's --monitor-interval is
    long so that the survivor meets the failed collective before torchrun stops it (the other
    order, SIGTERM first, is the SIGTERM line: tests/test_distributed.py)."""
    script = tmp_path / "killed_train.py"
    script.write_text(KILL_RANK_1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "--monitor-interval", "30", str(script),
                          *cli(tmp_path, synthetic_root, "--batch-size", "1", "--workers", "0", "--epochs", "1")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out.stderr[-3000:]
    assert "probably because one of them died" in errors[0] or "stopped by SIGTERM" in errors[0], errors[0]
    assert not [line for line in out.stderr.splitlines() if line.startswith("RuntimeError")], out.stderr[-3000:]
    assert not checkpoint_files(tmp_path / "ck" / "t", "t")


# ---------------------------------------------------------------------------------------------
# Faults and bad input


def test_nan_loss_stops_with_the_batch(synthetic_root, tmp_path, monkeypatch):
    original = GFRTMStep.loss

    def nan_loss(self, *a, **k):
        loss, stats = original(self, *a, **k)
        return loss * float("nan"), stats

    monkeypatch.setattr(GFRTMStep, "loss", nan_loss)
    with pytest.raises(FloatingPointError, match=r"epoch 1, batch 0: synthetic:synth-train-0\d/object \d/frames"):
        run_training(parse(tmp_path, synthetic_root, "--epochs", "1"))
    assert not checkpoint_files(tmp_path / "ck" / "t", "t")


def test_missing_roots_and_split_lists(tmp_path, synthetic_root, monkeypatch):
    monkeypatch.delenv("DAVIS_ROOT", raising=False)
    monkeypatch.delenv("YTVOS_ROOT", raising=False)
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match="no DAVIS root given.*--davis-root"):
        build_sources("dv2017", None, None, cache)
    with pytest.raises(FileNotFoundError, match="nowhere.*--davis-root"):
        build_sources("dv2017", str(tmp_path / "nowhere"), None, cache)
    with pytest.raises(FileNotFoundError, match="--ytvos-root"):
        build_sources("ytvos2018", None, None, cache)
    with pytest.raises(FileNotFoundError, match="jjtrain videos are missing"):
        build_sources("yt2018", None, str(synthetic_root), cache)
    with pytest.raises(FileNotFoundError, match="sequence list not found"):
        build_sources("ytvos2018", None, str(synthetic_root), cache, ytvos_split_file=str(tmp_path / "none.txt"))
    # Through the script: one "error:" line, exit status 2, no traceback.
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--dset", "dv2017", "--davis-root",
                          str(tmp_path / "nowhere"), "--dev", "cpu"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "error: DAVIS root not found" in out.stderr and "Traceback" not in out.stderr


def _write_davis_like(root: Path, sequences: dict[str, list[np.ndarray]], size=SIZE) -> None:
    """A DAVIS-layout train split from label maps (one list of H x W uint8 arrays per sequence)."""
    for name, labels in sequences.items():
        (root / "JPEGImages" / "480p" / name).mkdir(parents=True)
        (root / "Annotations" / "480p" / name).mkdir(parents=True)
        for t, label in enumerate(labels):
            Image.fromarray(np.full((*size, 3), 40 * t % 255, np.uint8)).save(
                root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg")
            write_label_png(root / "Annotations" / "480p" / name / f"{t:05d}.png", label)
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "train.txt").write_text("\n".join([*sequences, "missing-seq"]) + "\n")


def test_short_sequences_and_invisible_objects_are_skipped(tmp_path, caplog):
    def frame(t: int, small: bool = True) -> np.ndarray:
        label = np.zeros(SIZE, np.uint8)
        label[10:30, 10 + t:30 + t] = 1  # 400 pixels: visible
        if small:
            label[40:45, 60:65] = 2  # 25 pixels: never visible
        return label

    _write_davis_like(tmp_path, {"long": [frame(t) for t in range(6)], "short": [frame(t) for t in range(3)]})
    with caplog.at_level(logging.INFO):
        sources = build_sources("synthetic", str(tmp_path), None, tmp_path / "cache", SIZE, sample_size=4)
    assert sources[0].objects == [("long", 1)]
    assert "skipping 1 of 3 sequences without frames or annotations" in caplog.text  # missing-seq
    assert "skipping 1 sequences with fewer than 5 annotated frames" in caplog.text  # short
    assert "skipping 1 objects that are never visible" in caplog.text  # object 2
    assert list((tmp_path / "cache").glob("synthetic_pixel_counts_64x112_*.json"))  # cached outside the package

    specs = epoch_samples(sources, seed=3, epoch=1, sample_size=4)
    assert len(specs) == 8  # DAVIS: 8 samples per object and epoch
    for spec in specs:
        assert len(spec.frames) == 4 == len(set(spec.frames)) and spec.object_id == 1
    assert specs == epoch_samples(sources, seed=3, epoch=1, sample_size=4)  # seeded by (seed, epoch)
    assert specs != epoch_samples(sources, seed=3, epoch=2, sample_size=4)

    with pytest.raises(ValueError, match="no sequence with a visible object and >= 7 annotated frames"):
        build_sources("synthetic", str(tmp_path), None, tmp_path / "cache", SIZE, sample_size=6)


def test_an_unreadable_frame_is_replaced_by_the_next_sample(synthetic_root, tmp_path, caplog):
    sources = build_sources("synthetic", str(synthetic_root), None, tmp_path / "cache", SIZE, FRAMES)
    specs = epoch_samples(sources, 0, 1, FRAMES)[:2]
    broken = tmp_path / "broken"
    src = sources[0]
    for seq in src.frame_names:  # a copy of the frames with the first sample's reference frame corrupt
        (broken / seq).mkdir(parents=True)
        for f in (src.image_dir / seq).iterdir():
            (broken / seq / f.name).write_bytes(f.read_bytes())
    corrupt = [f for f in specs[0].frames if specs[1].sequence != specs[0].sequence or f not in specs[1].frames]
    (broken / specs[0].sequence / f"{src.frame_names[specs[0].sequence][corrupt[0]]}.jpg").write_bytes(b"x")
    src.image_dir = broken
    images, labels, index = TrainingSamples(sources, specs, SIZE)[0]
    assert index == 1 and images.shape == (FRAMES, 3, *SIZE) and labels.shape == (FRAMES, 1, *SIZE)
    assert "skipping sample synthetic:" in caplog.text


def test_youtube_vos_training_source(tmp_path):
    """jjtrain-style training data in the YouTube-VOS layout (every 5th frame annotated)."""
    from dataset.synthetic import make_ytvos_like

    make_ytvos_like(tmp_path / "yt", num_sequences=1, num_frames=40, size=SIZE, num_objects=2, seed=0,
                    num_train_sequences=2)
    sources = build_sources("ytvos2018", None, str(tmp_path / "yt"), tmp_path / "cache", SIZE, 6,
                            ytvos_split_file=str(tmp_path / "yt" / "ytvos_jjtrain.txt"))
    assert sources[0].name == "ytvos2018" and len(sources[0].objects) >= 2
    specs = epoch_samples(sources, 0, 1, 6)
    images, labels, index = TrainingSamples(sources, specs, SIZE)[0]
    assert images.shape == (6, 3, *SIZE) and labels.shape == (6, 1, *SIZE) and index == 0
    assert labels[0].sum() > 0  # the reference frame shows the object
    assert set(labels.unique().tolist()) <= {0, 1}
    # Samples are drawn per epoch from --seed: the same epoch gives the same samples.
    assert [s.frames for s in epoch_samples(sources, 0, 1, 6)] == [s.frames for s in specs]
    assert [s.frames for s in epoch_samples(sources, 0, 2, 6)] != [s.frames for s in specs]


def test_davis_visibility_rules():
    counts = np.zeros((60, 3))
    counts[:, 0] = 5000
    counts[:, 1] = 1000
    counts[10:20, 1] = 200  # under 1/4 of the peak: occluded ...
    counts[30:35, 1] = 50  # ... and under the hard minimum
    counts[:, 2] = 150
    vis = davis_visibility("bear", counts)
    assert vis[0, 1] and not vis[10, 1] and not vis[30, 1] and vis[0, 2]
    vis = davis_visibility("bus", counts)  # never occluded: only the hard minimum
    assert vis[10, 1] and not vis[30, 1]
    drone = np.full((60, 2), 2000.0)
    drone[:, 1] = 150  # under 1/10 of the peak (fraction 0.1 for drone) ...
    drone[40, 1] = 2000
    vis = davis_visibility("drone", drone)  # ... but the rule is lifted for object 1 in frames 0-16 and 24-59
    assert vis[10, 1] and not vis[20, 1] and vis[30, 1] and vis[40, 1]
    counts[:, 2] = 110
    counts[5, 2] = 1000
    assert not davis_visibility("classic-car", counts)[57, 2] and davis_visibility("classic-car", counts)[50, 2]
    assert davis_visibility("night-race", counts)[57, 2]  # the green car: lifted everywhere
    assert np.array_equal(plain_visibility("x", counts), counts >= 100)


def test_init_from_frtm_and_gfrtm_checkpoints(tmp_path, synthetic_root):
    with torch.random.fork_rng():
        torch.manual_seed(3)
        source = GFRTM("resnet18")
    frtm = {"model": {k: v for k, v in source.state_dict().items() if k.split(".")[0] not in GATE_MODULES}}
    torch.save(frtm, tmp_path / "frtm.pth")
    net = initial_network(parse(tmp_path, synthetic_root, "--initPth", str(tmp_path / "frtm.pth")))
    fresh = initial_network(parse(tmp_path, synthetic_root))
    assert torch.equal(net.decoder.TSE.layer4.reduce[0].weight, source.decoder.TSE.layer4.reduce[0].weight)
    assert torch.equal(net.upsampler.conv1.weight, source.upsampler.conv1.weight)
    assert torch.equal(net.template_matching.key[0].weight, fresh.template_matching.key[0].weight)  # fresh
    assert torch.equal(net.reuse_gate.conv2.bias, torch.tensor([0.1, 2.0]))
    save_checkpoint(tmp_path / "gfrtm.pth", source)
    net = initial_network(parse(tmp_path, synthetic_root, "--initPth", str(tmp_path / "gfrtm.pth")))
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in net.state_dict().items())
    # As upstream's trainer saves (stats of upstream's lib.utils.AverageMeter, upstream key names).
    upstream_trainer_checkpoint(source, tmp_path / "upstream_like.pth")
    net = initial_network(parse(tmp_path, synthetic_root, "--initPth", str(tmp_path / "upstream_like.pth")))
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in net.state_dict().items())
    save_checkpoint(tmp_path / "rn101.pth", GFRTM("resnet101"))
    with pytest.raises(ValueError, match="resnet101"):
        initial_network(parse(tmp_path, synthetic_root, "--initPth", str(tmp_path / "rn101.pth")))


def test_target_model_cache_hits_and_retrains_corrupt_entries(tmp_path, caplog):
    backbone = Backbone("resnet18", "random", seed=0)
    cache = TargetModelCache(tmp_path, backbone, torch.device("cpu"), num_aug=1)
    image = torch.randint(0, 255, (3, *SIZE)).float()
    mask = torch.zeros(1, *SIZE)
    mask[:, 20:40, 30:60] = 1
    a = cache.get("seq", 3, 1, image, mask)
    path = cache.file("seq", 3, 1)
    assert path == tmp_path / "resnet18-c32_gTrue" / "seq" / "00003.1.layer4.pth"
    assert path.is_file() and cache.misses == 1 and set(torch.load(path)) == {"project.weight", "filter.weight"}
    assert cache.get("seq", 3, 1, image, mask) is a  # from memory
    assert cache.hits == 1 and cache.hit_rate == 0.5
    # Without memory every lookup reads the file: the same weights; a corrupt file is retrained.
    disk = TargetModelCache(tmp_path, backbone, torch.device("cpu"), num_aug=1, memory_size=0)
    b = disk.get("seq", 3, 1, image, mask)
    assert disk.hits == 1 and disk.misses == 0 and b is not a
    assert torch.equal(a.filter.weight, b.filter.weight) and torch.equal(a.project.weight, b.project.weight)
    path.write_bytes(b"truncated")
    disk.get("seq", 3, 1, image, mask)
    assert disk.misses == 1 and "retraining" in caplog.text
    assert torch.load(path)["project.weight"].shape == (32, 256, 1, 1)  # rewritten
    malicious_checkpoint(path, "os.system", tmp_path / "MARKER")  # read without running it, then retrained
    disk.get("seq", 3, 1, image, mask)
    assert disk.misses == 2 and not (tmp_path / "MARKER").exists() and "posix.system" in caplog.text
    assert not list(path.parent.glob(".*.tmp"))
    # The memory keeps the last `memory_size` entries used.
    small = TargetModelCache(tmp_path, backbone, torch.device("cpu"), num_aug=1, memory_size=1)
    small.get("seq", 3, 1, image, mask)
    newest = small.get("seq", 4, 1, image, mask)
    assert small.get("seq", 4, 1, image, mask) is newest
    assert small.get("seq", 3, 1, image, mask) is not small.get("seq", 4, 1, image, mask)
    # With first-frame augmentation (upstream: 15 images), seeded: the same model twice.
    augmented = [TargetModelCache(tmp_path / f"aug{i}", backbone, torch.device("cpu"), num_aug=3, seed=1)
                 .get("seq", 3, 1, image, mask) for i in range(2)]
    assert torch.equal(augmented[0].filter.weight, augmented[1].filter.weight)
    assert not torch.equal(augmented[0].filter.weight, a.filter.weight)


# ---------------------------------------------------------------------------------------------
# Pieces of the step, and the command line


def test_straight_through_gate_and_margin():
    logits = torch.tensor([[0.3, -0.2], [-1.0, 2.0]], requires_grad=True)
    gate, probs = straight_through_gate(logits)
    assert gate.tolist() == [[1.0], [0.0]]  # exactly the hard argmax: index 0 = reuse
    gate.sum().backward()
    soft = logits.detach().clone().requires_grad_()
    torch.softmax(soft, dim=1)[:, 0].sum().backward()
    assert torch.allclose(logits.grad, soft.grad)  # the softmax's gradient
    iou = torch.tensor([0.2, 0.9])
    assert torch.allclose(gate_target(iou, 0.5, False), torch.tensor([[0.2, 0.8], [0.9, 0.1]]))
    assert torch.allclose(gate_target(iou, 0.5, True), torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    config = GateLossConfig(m1=1.0, margin_epochs=120)
    assert config.margin(30) == 0.25 and config.margin(500) == 1.0


def test_every_flag_has_help_and_a_working_type(tmp_path):
    parser = train.get_parser()
    for action in parser._actions:
        assert action.help, action.dest
    args = parser.parse_args(["--name", "n", "--ftext", "resnet101", "--dset", "yt2018", "--dev", "cpu",
                              "--m1", "0.5", "--m2", "0.1", "--marginEp", "60", "--apply-margin",
                              "--initPth", "a.pth", "--resume", "b.pth", "--davis-root", "d", "--ytvos-root", "y",
                              "--ytvos-split-file", "s.txt", "--synthetic-root", "sy", "--checkpoints", "c",
                              "--tensorboard", "t", "--tmcache", "m", "--cache-dir", "cd", "--size", "240x427",
                              "--frames", "4", "--epochs", "3", "--batch-size", "2", "--lr", "1e-4",
                              "--weight-decay", "0", "--lr-step", "2", "--lr-gamma", "0.5",
                              "--samples-per-epoch", "16", "--num-aug", "5", "--clip-grad", "1.5", "--workers", "0",
                              "--backbone-weights", "random", "--seed", "7"])
    assert args.size == (240, 427) and args.frames == 4 and args.apply_margin and args.initPth == Path("a.pth")
    assert args.m2 == 0.1 and args.marginEp == 60 and args.seed == 7 and args.clip_grad == 1.5
    for bad in (["--size", "480"], ["--frames", "1"], ["--batch-size", "0"], ["--lr", "-1"], ["--m2", "-0.1"],
                ["--dset", "dv2016"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    defaults = parser.parse_args([])
    assert (defaults.epochs, defaults.batch_size, defaults.lr, defaults.lr_step, defaults.size, defaults.frames,
            defaults.num_aug, defaults.marginEp, defaults.apply_margin) == (260, 8, 5e-4, 127, (480, 854), 6, 15,
                                                                             120, False)
    assert train.config_from_args(defaults) == TrainConfig()  # the flags' defaults are the config's
    assert train.config_from_args(args).initPth == Path("a.pth")


def test_keep_checkpoints_deletes_only_older_ones(synthetic_root, tmp_path):
    """--keep-checkpoints 2: after 3 epochs the newest two remain, and resume finds the newest."""
    from trainers.trainer import checkpoint_files
    args = parse(tmp_path, synthetic_root, "--epochs", "3", "--keep-checkpoints", "2", "--samples-per-epoch", "2")
    run_training(args)
    kept = checkpoint_files(args.checkpoints / args.name, args.name)
    assert [p.name for p in kept] == [f"{args.name}_ep0002.pth", f"{args.name}_ep0003.pth"]
    assert torch.load(kept[-1], weights_only=True)["epoch"] == 3  # plain types only


def test_segmentation_loss_is_upstreams_in_fp32():
    """fp32: BCE on the probabilities, as upstream (no gradient where the sigmoid saturates);
    under autocast: BCE with logits (the same value where nothing saturates)."""
    from trainers.gfrtm_step import segmentation_loss
    mask = torch.tensor([0.0, 1.0, 0.0])
    grads = {}
    for name in ("fp32", "autocast"):
        logits = torch.tensor([40.0, -0.5, 0.3], requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "autocast"):
            loss = segmentation_loss(logits, torch.sigmoid(logits), mask)
        loss.backward()
        grads[name] = logits.grad
    assert grads["fp32"][0] == 0 and grads["autocast"][0] == pytest.approx(1 / 3, rel=1e-3)
    torch.testing.assert_close(grads["fp32"][1:], grads["autocast"][1:], atol=1e-6, rtol=1e-5)


def test_malicious_init_and_resume_checkpoints_run_nothing(tmp_path, synthetic_root):
    """--initPth and --resume read through the same reader: one error line, exit 2, no marker."""
    marker = tmp_path / "MARKER"
    evil = malicious_checkpoint(tmp_path / "evil.pth", "os.system", marker)
    for flag in ("--initPth", "--resume"):
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *cli(tmp_path, synthetic_root, flag, str(evil))],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]  # beside progress bars
        assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert errors[0].startswith(f"error: checkpoint {evil} was not loaded: it would call posix.system")
        assert not marker.exists()


@pytest.mark.parametrize("flag", ["--checkpoints", "--tensorboard", "--tmcache"])
def test_unusable_output_folders_are_one_error_line(flag, synthetic_root, tmp_path, blocked, monkeypatch, capsys):
    argv = cli(tmp_path, synthetic_root, "--epochs", "1", "--workers", "0", flag, str(blocked / "x"))
    code, err = run_script(monkeypatch, capsys, train.main, train.get_parser(), argv)
    assert_output_error(code, err, blocker=blocked)
    assert flag in err
    assert not (tmp_path / "ck").exists() or not list((tmp_path / "ck").rglob("*.pth"))  # nothing trained
