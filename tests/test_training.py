"""Training on the synthetic data set (CPU, tiny images): the loss goes down, checkpoints are
complete, atomic and resumable (also after SIGKILL), torchrun runs, bad input is reported."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from dataset.synthetic import make_davis_like
from dataset.training import TrainingSamples, build_sources, epoch_samples
from models import build_tracker
from models.backbone import Backbone
from models.checkpoint import GATE_MODULES, read_checkpoint, save_checkpoint
from models.network import GFRTM
from trainers.gfrtm_step import GateLossConfig, GFRTMStep
from trainers.tmcache import TargetModelCache
from trainers.trainer import checkpoint_files

ROOT = Path(__file__).resolve().parents[1]
SIZE = "64x112"


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    make_davis_like(root, num_sequences=1, num_frames=8, size=(64, 112), num_objects=2, seed=0, num_train_sequences=2)
    return root


def train_args(tmp_path: Path, synthetic_root: Path, *extra: str):
    return train.get_parser().parse_args([
        "--name", "t", "--dset", "synthetic", "--synthetic-root", str(synthetic_root),
        "--checkpoints", str(tmp_path / "ck"), "--tensorboard", str(tmp_path / "tb"),
        "--tmcache", str(tmp_path / "tm"), "--cache-dir", str(tmp_path / "cache"), "--size", SIZE,
        "--batch-size", "2", "--samples-per-epoch", "2", "--workers", "0", "--num-aug", "1",
        "--backbone-weights", "random", "--dev", "cpu", *extra])


def command(tmp_path: Path, synthetic_root: Path, *extra: str) -> list[str]:
    args = ["--name", "t", "--dset", "synthetic", "--synthetic-root", str(synthetic_root),
            "--checkpoints", str(tmp_path / "ck"), "--tensorboard", str(tmp_path / "tb"),
            "--tmcache", str(tmp_path / "tm"), "--cache-dir", str(tmp_path / "cache"), "--size", SIZE,
            "--batch-size", "1", "--samples-per-epoch", "2", "--workers", "0", "--num-aug", "1",
            "--backbone-weights", "random", *extra]
    return args


def test_loss_decreases_on_a_fixed_batch(synthetic_root, tmp_path):
    torch.manual_seed(0)
    sources = build_sources("synthetic", str(synthetic_root), None, tmp_path / "cache")
    data = TrainingSamples(sources, epoch_samples(sources, 0, 1, 6)[:2], (64, 112))
    images, labels = zip(*[data[i][:2] for i in range(2)])
    images, labels = torch.stack(images).float(), torch.stack(labels).float()
    frames = [images[:, t] for t in range(images.shape[1])]
    masks = [labels[:, t] for t in range(labels.shape[1])]
    backbone = Backbone("resnet18", "random", seed=0)
    cache = TargetModelCache(tmp_path / "tm", backbone, torch.device("cpu"), num_aug=1)
    targets = [cache.get(s.sequence, s.frames[0], s.object_id, frames[0][b], masks[0][b])
               for b, s in enumerate(data.specs)]
    net = GFRTM("resnet18").train()
    step = GFRTMStep(net, backbone, GateLossConfig())
    optimizer = torch.optim.Adam(net.parameters(), lr=5e-4, amsgrad=True)
    losses = []
    for _ in range(6):
        loss, stats, _ = step.loss(frames, masks, targets, 1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert set(stats) >= {"loss_seg", "loss_diff", "loss_gp", "accuracy", "reuse_rate", "margin"}


def test_checkpoint_resume_and_tracker(synthetic_root, tmp_path, capsys):
    train.main(train_args(tmp_path, synthetic_root, "--epochs", "1"))
    first = tmp_path / "ck" / "t" / "t_ep0001.pth"
    ckpt = read_checkpoint(first)
    assert {"model", "optimizer", "scheduler", "epoch", "args", "format"} <= set(ckpt) and ckpt["epoch"] == 1
    assert build_tracker(first, backbone_weights="random", num_aug=1).network.has_gate
    assert list((tmp_path / "tm" / "resnet18-c32_gTrue").rglob("*.layer4.pth"))  # target models cached
    assert list((tmp_path / "tb" / "t").glob("events.out.tfevents.*"))

    # Resuming restores epoch, optimizer and scheduler state exactly.
    from trainers.trainer import Trainer
    args = train_args(tmp_path, synthetic_root, "--epochs", "2")
    net = train.build_network(args)
    opt, sched = train.build_optimizer(net, args)
    backbone = Backbone("resnet18", "random", seed=0)
    trainer = Trainer(GFRTMStep(net, backbone, GateLossConfig()), opt, sched, [], None, args, torch.device("cpu"),
                      tmp_path / "ck" / "t", tmp_path / "tb2")
    trainer.resume()
    assert trainer.epoch == 1
    saved = ckpt["optimizer"]["state"]
    assert all(torch.equal(opt.state_dict()["state"][k]["exp_avg"], v["exp_avg"]) for k, v in saved.items())
    assert sched.state_dict() == ckpt["scheduler"]

    capsys.readouterr()
    train.main(args)
    assert "continuing with epoch 2" in capsys.readouterr().out
    assert read_checkpoint(tmp_path / "ck" / "t" / "t_ep0002.pth")["epoch"] == 2


def test_sigkill_then_resume(synthetic_root, tmp_path):
    ck = tmp_path / "ck" / "t"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *command(tmp_path, synthetic_root, "--epochs", "50")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not checkpoint_files(ck, "t"):
            time.sleep(0.2)
        assert checkpoint_files(ck, "t"), "no checkpoint appeared"
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = checkpoint_files(ck, "t")
    for path in done:  # every checkpoint file left is complete
        assert read_checkpoint(path)["epoch"] == int(path.stem.split("_ep")[1])
    epoch = read_checkpoint(done[-1])["epoch"]
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), *command(tmp_path, synthetic_root, "--epochs", str(epoch + 1))],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"continuing with epoch {epoch + 1}" in out.stdout
    assert not list(ck.glob(".*.tmp")) and not list(ck.glob("*.tmp"))


def test_torchrun_two_processes(synthetic_root, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                          str(ROOT / "train.py"), *command(tmp_path, synthetic_root, "--epochs", "1")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 process(es)" in out.stdout and "-> identical" in out.stdout
    assert [p.name for p in (tmp_path / "ck" / "t").iterdir()] == ["t_ep0001.pth"]  # rank 0 only
    assert len(list((tmp_path / "tb" / "t").glob("events.out.tfevents.*"))) == 1


def test_nan_loss_stops_with_the_batch(synthetic_root, tmp_path, monkeypatch):
    original = GFRTMStep.loss

    def nan_loss(self, *a, **k):
        loss, stats, visuals = original(self, *a, **k)
        return loss * float("nan"), stats, visuals

    monkeypatch.setattr(GFRTMStep, "loss", nan_loss)
    with pytest.raises(FloatingPointError, match=r"epoch 1, batch 0: synthetic:synth-train-0\d/object \d"):
        train.main(train_args(tmp_path, synthetic_root, "--epochs", "1"))
    assert not (tmp_path / "ck" / "t" / "t_ep0001.pth").exists()


def test_bad_inputs(tmp_path, synthetic_root, monkeypatch):
    monkeypatch.delenv("DAVIS_ROOT", raising=False)
    args = train_args(tmp_path, synthetic_root, "--epochs", "1")
    args.dset = "dv2017"
    args.davis_root = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere.*--davis-root"):
        train.main(args)
    args.dset, args.ytvos_root = "ytvos2018", str(synthetic_root)
    with pytest.raises(FileNotFoundError, match="jjtrain videos are missing"):
        train.main(args)


def test_init_from_frtm_checkpoint(tmp_path, synthetic_root):
    torch.manual_seed(3)
    source = GFRTM("resnet18")
    frtm = {"model": {k: v for k, v in source.state_dict().items() if k.split(".")[0] not in GATE_MODULES}}
    torch.save(frtm, tmp_path / "frtm.pth")
    net = train.build_network(train_args(tmp_path, synthetic_root, "--initPth", str(tmp_path / "frtm.pth")))
    assert torch.equal(net.decoder.TSE.layer4.reduce[0].weight, source.decoder.TSE.layer4.reduce[0].weight)
    assert torch.equal(net.reuse_gate.conv2.bias, torch.tensor([0.1, 2.0]))  # the gate stays fresh
    save_checkpoint(tmp_path / "rn101.pth", GFRTM("resnet101"))
    with pytest.raises(ValueError, match="resnet101"):
        train.build_network(train_args(tmp_path, synthetic_root, "--initPth", str(tmp_path / "rn101.pth")))


def test_target_model_cache_hits_and_retrains_corrupt_entries(tmp_path, caplog):
    backbone = Backbone("resnet18", "random", seed=0)
    cache = TargetModelCache(tmp_path, backbone, torch.device("cpu"), num_aug=1)
    image = torch.randint(0, 255, (3, 64, 112)).float()
    mask = torch.zeros(1, 64, 112)
    mask[:, 20:40, 30:60] = 1
    a = cache.get("seq", 3, 1, image, mask)
    path = cache.file("seq", 3, 1)
    assert path.is_file() and path.name == "00003.1.layer4.pth" and cache.misses == 1
    b = cache.get("seq", 3, 1, image, mask)
    assert cache.hits == 1 and torch.equal(a.filter.weight, b.filter.weight)
    path.write_bytes(b"truncated")
    cache.get("seq", 3, 1, image, mask)
    assert cache.misses == 2 and "retraining" in caplog.text


def test_youtube_vos_training_source(tmp_path):
    """jjtrain-style training data in the YouTube-VOS layout (every 5th frame annotated)."""
    from dataset.synthetic import make_ytvos_like

    make_ytvos_like(tmp_path / "yt", num_sequences=1, num_frames=40, size=(64, 112), num_objects=2, seed=0,
                    num_train_sequences=2)
    sources = build_sources("ytvos2018", None, str(tmp_path / "yt"), tmp_path / "cache",
                            ytvos_split_file=str(tmp_path / "yt" / "ytvos_jjtrain.txt"))
    assert sources[0].name == "ytvos2018" and len(sources[0].objects) >= 2
    specs = epoch_samples(sources, 0, 1, 6)
    images, labels, index = TrainingSamples(sources, specs, (64, 112))[0]
    assert images.shape == (6, 3, 64, 112) and labels.shape == (6, 1, 64, 112) and index == 0
    assert labels[0].sum() > 0  # the reference frame shows the object
    assert set(labels.unique().tolist()) <= {0, 1}
    # Samples are drawn per epoch from --seed: the same epoch gives the same samples.
    assert [s.frames for s in epoch_samples(sources, 0, 1, 6)] == [s.frames for s in specs]
    assert [s.frames for s in epoch_samples(sources, 0, 2, 6)] != [s.frames for s in specs]
