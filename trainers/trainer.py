"""Training G-FRTM: its config (`TrainConfig`, train.py's flags), the network and optimizer
builders, `run_training(config)` (one process or one torchrun rank), and the loop (`Trainer`):
optimizer, scheduler, checkpoints, resume, TensorBoard, distributed.

The step (`trainers.gfrtm_step.GFRTMStep`) computes the loss; only this loop calls backward,
steps, clips and logs. Checkpoints are complete (model, optimizer, scheduler, epoch, args: the
config) and
written atomically by rank 0 after every epoch as `<checkpoint_dir>/<name>_epNNNN.pth`; a run
resumes from the newest one. Under torchrun (DistributedDataParallel) every process trains on
its own share of each epoch's samples; only rank 0 writes checkpoints and logs.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from dataset.synthetic import make_davis_like
from dataset.training import SAMPLE_SIZE, References, TrainingSamples, build_sources, epoch_samples
from lib import distributed
from lib.device import resolve_device
from lib.errors import UsageError
from lib.fileio import make_dirs
from models.backbone import Backbone
from models.checkpoint import check_backbone, load_network_state, network_state, read_checkpoint, save_checkpoint
from models.network import GFRTM
from lib.precision import autocast, check_precision

from .gfrtm_step import STAT_KEYS, GateLossConfig, GFRTMStep
from .tmcache import TargetModelCache, writable_cache

log = logging.getLogger(__name__)

GATE_LAST_BIAS = (0.1, 2.0)  # upstream's initial (reuse, compute) bias: the gate starts mostly computing


def _env_path(name: str, default: str):
    """A dataclass default: $name, else `default`, read when the config is made."""
    return field(default_factory=lambda: Path(os.environ.get(name, default)))


@dataclass
class TrainConfig:
    """A training run (train.py's flags, docs/training.md). Roots left None are read from the
    environment ($DAVIS_ROOT, $YTVOS_ROOT); the output roots default to $RVOS_CHECKPOINTS,
    $RVOS_TENSORBOARD, $RVOS_TMCACHE and $RVOS_CACHE, else ./save_dir[/cache]. size: (H, W)."""
    name: str = "All_RN18_m1000_b8seq6"
    ftext: str = "resnet18"
    dset: str = "all"
    m1: float = 1.0
    m2: float = 0.0
    marginEp: int = 120
    apply_margin: bool = False
    initPth: Optional[Path] = None
    resume: Optional[Path] = None
    davis_root: Optional[Path] = None
    ytvos_root: Optional[Path] = None
    ytvos_split_file: Optional[str] = None
    synthetic_root: Path = Path("./save_dir/synthetic")
    checkpoints: Path = _env_path("RVOS_CHECKPOINTS", "./save_dir")
    tensorboard: Path = _env_path("RVOS_TENSORBOARD", "./save_dir")
    tmcache: Path = _env_path("RVOS_TMCACHE", "./save_dir")
    cache_dir: Path = _env_path("RVOS_CACHE", "./save_dir/cache")
    size: tuple[int, int] = (480, 854)
    frames: int = SAMPLE_SIZE
    epochs: int = 260
    keep_checkpoints: Optional[int] = None
    batch_size: int = 8
    lr: float = 5e-4
    weight_decay: float = 1e-5
    lr_step: int = 127
    lr_gamma: float = 0.1
    samples_per_epoch: Optional[int] = None
    clip_grad: float = 0.0
    workers: int = 4
    dev: Optional[str] = None
    precision: str = "fp32"
    num_aug: int = 15
    backbone_weights: str = "imagenet"
    seed: int = 0


# The flags (and variables) that place the outputs, named when a folder cannot be made.
CHECKPOINTS_FLAG = "--checkpoints or $RVOS_CHECKPOINTS"
TENSORBOARD_FLAG = "--tensorboard or $RVOS_TENSORBOARD"


def initial_network(config: TrainConfig) -> GFRTM:
    """A fresh network (seeded by config.seed without touching the global RNG; the gate's last
    bias as upstream), optionally initialized from config.initPth."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = GFRTM(config.ftext)
    with torch.no_grad():
        net.reuse_gate.conv2.bias.copy_(torch.tensor(GATE_LAST_BIAS))
    if config.initPth is not None:
        state, backbone, has_gate = network_state(read_checkpoint(config.initPth))
        check_backbone(backbone, config.ftext, f"--initPth {config.initPth}")
        if not has_gate:  # FRTM: decoder and upsampler only, the gate parts stay fresh
            state = {**{k: v for k, v in net.state_dict().items() if k not in state}, **state}
        load_network_state(net, state)
        print(f"initialized from {config.initPth} ({'G-FRTM' if has_gate else 'FRTM: decoder and upsampler'})")
    return net


def build_optimizer(network: GFRTM, config: TrainConfig):
    """Adam (amsgrad), weight decay except on the reuse gate, and StepLR, as upstream."""
    gate_params = list(network.reuse_gate.parameters())
    other_params = [p for n, p in network.named_parameters() if not n.startswith("reuse_gate.")]
    optimizer = torch.optim.Adam([{"params": gate_params, "weight_decay": 0.0},
                                  {"params": other_params, "weight_decay": config.weight_decay}],
                                 lr=config.lr, betas=(0.9, 0.999), amsgrad=True)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step, gamma=config.lr_gamma)


def run_training(config: TrainConfig) -> dict:
    """Train as `config` says, in this process or as one torchrun rank (DistributedDataParallel);
    returns the last epoch's statistics. Checkpoints: <checkpoints>/<name>/<name>_epNNNN.pth."""
    ctx = distributed.launch_context()
    device, description = resolve_device(distributed.rank_device(ctx, config.dev))
    ctx = distributed.init(ctx, device)
    # Rank 0 reports; the others only warn (with their rank).
    logging.basicConfig(level=logging.INFO if ctx.is_main else logging.WARNING,
                        format=f"%(levelname)s [rank {ctx.rank}] %(message)s" if ctx.distributed
                        else "%(levelname)s %(message)s")
    try:
        return _train(config, ctx, device, description)
    finally:
        distributed.shutdown(ctx)


def _train(config: TrainConfig, ctx: distributed.Context, device: torch.device, description: str) -> dict:
    check_precision(config.precision, device)  # before any data is prepared
    if ctx.is_main:  # the output folders next: an unusable path is reported before any work
        make_dirs(Path(config.checkpoints) / config.name, "the checkpoint folder", CHECKPOINTS_FLAG)
        make_dirs(Path(config.tensorboard) / config.name, "the TensorBoard folder", TENSORBOARD_FLAG)
        writable_cache(config.tmcache)
    if ctx.is_main:
        print(f"device: {description}; {ctx.world_size} process(es)", flush=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed training size, as upstream

    davis_root = config.davis_root
    if config.dset == "synthetic":
        davis_root = str(config.synthetic_root)

        def generate():
            if not (Path(config.synthetic_root) / "ImageSets").is_dir():
                print(f"writing the synthetic training set to {config.synthetic_root}", flush=True)
                make_davis_like(config.synthetic_root, num_sequences=1, num_frames=max(12, config.frames + 2),
                                size=config.size, num_objects=2, seed=config.seed, num_train_sequences=3)
        distributed.main_first(ctx, generate)
    sources = distributed.main_first(ctx, lambda: build_sources(
        config.dset, davis_root, config.ytvos_root, config.cache_dir, config.size, config.frames,
        ytvos_split_file=config.ytvos_split_file))
    if ctx.is_main:
        print("training data: " + ", ".join(f"{s.name} ({len(s.objects)} objects in {len(s.reference)} sequences)"
                                            for s in sources), flush=True)

    backbone = Backbone(config.ftext, config.backbone_weights, seed=config.seed).to(device)
    network = initial_network(config).to(device)
    step = GFRTMStep(network, backbone, GateLossConfig(config.m1, config.m2, config.marginEp, config.apply_margin))
    optimizer, scheduler = build_optimizer(network, config)
    cache = TargetModelCache(config.tmcache, backbone, device, num_aug=config.num_aug, seed=config.seed)
    trainer = Trainer(step, optimizer, scheduler, sources, cache, config, device,
                      Path(config.checkpoints) / config.name, Path(config.tensorboard) / config.name,
                      ctx.rank, ctx.world_size)
    trainer.resume(config.resume)
    return trainer.train()


def checkpoint_files(directory: Path, name: str) -> list[Path]:
    """Complete checkpoints of a run, oldest to newest epoch."""
    pattern = re.compile(rf"{re.escape(name)}_ep(\d+)\.pth")
    found = [(int(m.group(1)), p) for p in Path(directory).glob(f"{name}_ep*.pth") if (m := pattern.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


class Trainer:
    def __init__(self, step: GFRTMStep, optimizer: torch.optim.Optimizer, scheduler, sources: list,
                 cache: Optional[TargetModelCache], config: TrainConfig, device: torch.device, checkpoint_dir: Path,
                 tensorboard_dir: Path, rank: int = 0, world_size: int = 1):
        self.step = step
        if world_size > 1:
            self.model = DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            self.model = step
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.sources = sources
        self.cache = cache
        self.config = config
        self.device = device
        # --precision: the step under autocast (weights and optimizer stay fp32); fp16 scales the
        # loss so that small gradients survive (a GradScaler; off, it changes nothing).
        self.precision = config.precision
        self.dtype = check_precision(self.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.checkpoint_dir = Path(checkpoint_dir)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.visuals: dict[str, torch.Tensor] = {}
        self.writer = None
        if rank == 0:
            make_dirs(self.checkpoint_dir, "the checkpoint folder", CHECKPOINTS_FLAG)
            for stale in self.checkpoint_dir.glob(".*.tmp"):  # left by a run killed while saving
                stale.unlink()
            from torch.utils.tensorboard import SummaryWriter
            make_dirs(tensorboard_dir, "the TensorBoard folder", TENSORBOARD_FLAG)
            self.writer = SummaryWriter(str(tensorboard_dir))

    @property
    def sample_size(self) -> int:
        return self.config.frames

    # Checkpoints -------------------------------------------------------------------------------

    def resume(self, path: Optional[Path] = None) -> None:
        """Continue from `path`, or from the newest readable checkpoint of this run if any."""
        ckpt = None
        if path is not None:
            ckpt = read_checkpoint(path)
        else:
            for candidate in reversed(checkpoint_files(self.checkpoint_dir, self.config.name)):
                try:
                    ckpt, path = read_checkpoint(candidate), candidate
                    break
                except (ValueError, OSError) as exc:  # cannot happen with atomic saves; be safe
                    log.warning("skipping unreadable checkpoint %s (%s)", candidate, exc)
        if ckpt is not None:
            self._load(ckpt, path)
        self._same_epoch_everywhere(path)
        if ckpt is not None and self.rank == 0:
            print(f"resumed from {path} (epoch {self.epoch}); continuing with epoch {self.epoch + 1}", flush=True)

    def _load(self, ckpt: dict, path) -> None:
        for key in ("optimizer", "scheduler", "epoch"):
            if key not in ckpt:
                raise UsageError(f"{path} is not a training checkpoint (no {key!r}); use --initPth to start from it")
        state, backbone, has_gate = network_state(ckpt)
        check_backbone(backbone, self.step.network.backbone_name, f"the checkpoint {path} to resume from")
        if not has_gate:
            raise UsageError(f"{path} is an FRTM checkpoint (no gate): use --initPth to start from it")
        load_network_state(self.step.network, state)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler.is_enabled() and ckpt.get("grad_scaler"):
            self.scaler.load_state_dict(ckpt["grad_scaler"])
        self.epoch = int(ckpt["epoch"])

    def _same_epoch_everywhere(self, path) -> None:
        """Every process must have resumed the same epoch (the checkpoint directory must be shared)."""
        if self.world_size == 1:
            return
        epochs = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(epochs, torch.tensor([self.epoch], dtype=torch.int64, device=self.device))
        epochs = [int(e.item()) for e in epochs]
        if len(set(epochs)) > 1:
            raise UsageError(f"processes resumed different epochs {epochs} (rank {self.rank}: {path}); the checkpoint "
                             f"directory {self.checkpoint_dir} must be shared by all processes, or pass --resume")

    def save(self, stats: dict) -> Optional[Path]:
        if self.rank != 0:
            return None
        path = self.checkpoint_dir / f"{self.config.name}_ep{self.epoch:04d}.pth"
        saved = save_checkpoint(path, self.step.network, optimizer=self.optimizer.state_dict(),
                                scheduler=self.scheduler.state_dict(), epoch=self.epoch, args=asdict(self.config),
                                stats=stats,
                                **({"grad_scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}))
        keep = self.config.keep_checkpoints
        if keep:  # only once the new one is complete on disk
            for old in checkpoint_files(self.checkpoint_dir, self.config.name)[:-keep]:
                old.unlink()
        return saved

    # Training ----------------------------------------------------------------------------------

    def _loader(self, dataset: TrainingSamples) -> DataLoader:
        """Shuffled per epoch; the order depends only on --seed and the epoch (and the rank's share)."""
        if self.world_size > 1:
            sampler = DistributedSampler(dataset, self.world_size, self.rank, shuffle=True, seed=self.config.seed)
            sampler.set_epoch(self.epoch)
        else:
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(self.config.seed * 100003 + self.epoch))
        return DataLoader(dataset, batch_size=self.config.batch_size, sampler=sampler, num_workers=self.config.workers,
                          pin_memory=self.device.type == "cuda",
                          generator=torch.Generator().manual_seed(self.config.seed * 100003 + self.epoch + 1))

    def epoch_dataset(self) -> TrainingSamples:
        """This epoch's samples (the same on every process)."""
        specs = epoch_samples(self.sources, self.config.seed, self.epoch, self.sample_size)
        if self.config.samples_per_epoch:
            order = np.random.default_rng([self.config.seed, self.epoch, 1]).permutation(len(specs))
            specs = [specs[i] for i in order[:self.config.samples_per_epoch]]
        return TrainingSamples(self.sources, specs, self.config.size)

    def train(self) -> dict:
        config = self.config
        last = {}
        if self.epoch >= config.epochs and self.rank == 0:
            print(f"already trained for {self.epoch} epochs (--epochs {config.epochs}): nothing to do", flush=True)
        while self.epoch < config.epochs:
            self.epoch += 1
            if self.rank == 0:
                margin = self.step.gate_loss.margin(self.epoch)
                applied = "applied" if self.step.gate_loss.apply_margin else "logged only, as upstream"
                print(f"epoch {self.epoch}/{config.epochs}: lr {self.scheduler.get_last_lr()[0]:.3g}, "
                      f"gate margin {margin:.4f} ({applied})", flush=True)
            last = self._epoch(self.epoch_dataset())
            self._average_buffers()
            self.scheduler.step()
            if self.rank == 0:
                path = self.save(last)
                self._log_epoch(last)
                print(f"epoch {self.epoch}/{config.epochs}: "
                      + ", ".join(f"{k} {v:.4f}" for k, v in last.items()) + f" -> {path}", flush=True)
            if self.world_size > 1:
                dist.barrier()
        self._check_replicas()
        if self.writer is not None:
            self.writer.close()
        return last

    def _epoch(self, dataset: TrainingSamples) -> dict:
        """One epoch: fill the target-model cache for its samples, train on every batch, and
        return the averaged statistics."""
        self.step.network.train()
        trained = self.fill_cache(dataset)
        loader = self._loader(dataset)
        sums = torch.zeros(len(STAT_KEYS) + 1, dtype=torch.float64)  # + batch count
        hits0, misses0 = self.cache.hits, self.cache.misses
        bar = tqdm(loader, desc=f"epoch {self.epoch}", unit="batch", disable=self.rank != 0, dynamic_ncols=True)
        for i, (images, labels, indices) in enumerate(bar):
            stats = self._train_batch(dataset, images, labels, indices, i)
            sums += torch.tensor([stats[k] for k in STAT_KEYS] + [1.0], dtype=torch.float64)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['accuracy']:.3f}",
                            reuse=f"{stats['reuse_rate']:.2f}", refresh=False)
            if self.writer is not None:
                step = (self.epoch - 1) * len(loader) + i
                for k in ("loss", *STAT_KEYS):
                    self.writer.add_scalar(f"batch/{k}", stats[k], step)
        counts = [self.cache.hits - hits0, self.cache.misses - misses0, trained]
        return self._epoch_stats(sums, counts)

    def fill_cache(self, dataset: TrainingSamples) -> int:
        """Train the missing target models of the epoch's samples before the epoch, so the batch
        loop only reads the cache. The reference frames are read by --workers DataLoader
        workers; under DDP each process trains its share of the missing entries, then all wait
        for each other. Returns the number this process trained."""
        if self.world_size > 1:
            dist.barrier()  # all processes see the same cache, so they agree on what is missing
        first_sample = {}  # entry -> the first sample using it
        for index, spec in enumerate(dataset.specs):
            first_sample.setdefault((spec.sequence, spec.frames[0], spec.object_id), index)
        missing = [index for key, index in first_sample.items() if not self.cache.has(*key)]
        mine = missing[self.rank::self.world_size]
        trained = 0
        if mine:
            # Its own generator: creating the iterator must not draw from the global RNG.
            loader = DataLoader(References(dataset, mine), batch_size=None, num_workers=self.config.workers,
                                generator=torch.Generator().manual_seed(self.config.seed))
            for index, image, mask in tqdm(loader, desc=f"epoch {self.epoch}: target models", unit="model",
                                           disable=self.rank != 0, dynamic_ncols=True):
                if image is None:  # unreadable: the epoch replaces the sample, its entry trained on demand
                    continue
                spec = dataset.specs[index]
                misses = self.cache.misses
                self.cache.get(spec.sequence, spec.frames[0], spec.object_id,
                               image.to(self.device).float(), mask.to(self.device).float())
                trained += self.cache.misses - misses
        if self.world_size > 1:
            dist.barrier()  # every process's entries are on disk before any batch needs them
        return trained

    def _targets(self, dataset: TrainingSamples, indices: torch.Tensor, images: torch.Tensor,
                 labels: torch.Tensor) -> list:
        """The target model of each sample of a batch (from the cache; trained only if the fill
        pass could not, e.g. a replaced sample), from its reference frame images[:, 0]."""
        targets = []
        for b, index in enumerate(indices.tolist()):
            spec = dataset.specs[index]
            targets.append(self.cache.get(spec.sequence, spec.frames[0], spec.object_id, images[b, 0], labels[b, 0]))
        return targets

    def _train_batch(self, dataset: TrainingSamples, images: torch.Tensor, labels: torch.Tensor,
                     indices: torch.Tensor, batch: int) -> dict:
        """One optimizer step on a batch (images (B, T, 3, H, W), labels (B, T, 1, H, W) uint8);
        returns the step's statistics."""
        images = images.to(self.device, non_blocking=True).float()
        labels = labels.to(self.device, non_blocking=True).float()
        frames = [images[:, t] for t in range(images.shape[1])]
        masks = [labels[:, t] for t in range(labels.shape[1])]
        targets = self._targets(dataset, indices, images, labels)

        with autocast(self.device, self.dtype):
            loss, stats = self.model(frames, masks, targets, self.epoch)
        self._stop_if_not_finite(loss, dataset, indices, batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.step.network.parameters(), self.config.clip_grad)
        self.scaler.step(self.optimizer)  # skipped by fp16 scaling when a gradient overflowed
        self.scaler.update()
        self.visuals = self.step.visuals
        return stats

    def _epoch_stats(self, sums: torch.Tensor, cache_counts: list) -> dict:
        """Averages over all processes' batches (sums: STAT_KEYS sums and the batch count), and
        the cache statistics of all processes (cache_counts: batch-loop hits and misses,
        entries trained before the epoch)."""
        counts = torch.tensor(cache_counts, dtype=torch.float64)
        if self.world_size > 1:
            both = torch.cat([sums, counts]).to(self.device)
            dist.all_reduce(both)
            sums, counts = both[:len(sums)].cpu(), both[len(sums):].cpu()
        count = max(sums[-1].item(), 1.0)
        averages = {k: sums[j].item() / count for j, k in enumerate(STAT_KEYS)}
        averages["loss"] = averages["loss_seg"] + averages["loss_diff"] + averages["loss_gp"]
        averages["lr"] = self.scheduler.get_last_lr()[0]
        averages["margin"] = self.step.gate_loss.margin(self.epoch)
        hits, misses, trained = counts.tolist()
        averages["cache_hits"] = hits
        averages["cache_hit_rate"] = hits / (hits + misses) if hits + misses else math.nan
        averages["cache_trained_before_epoch"] = trained
        if self.rank == 0:
            log.info("target-model cache: %d trained before the epoch; in the epoch %d found, %d trained "
                     "(hit rate %.1f%%) under %s", trained, hits, misses,
                     100 * averages["cache_hit_rate"] if hits + misses else 0.0, self.cache.path)
        return averages

    def _stop_if_not_finite(self, loss: torch.Tensor, dataset: TrainingSamples, indices: torch.Tensor,
                            batch: int) -> None:
        """Raise FloatingPointError naming the batch's samples when the loss is NaN or infinite;
        under DDP every process stops (the flag is all-reduced before backward): a process whose
        own loss is finite exits silently (status 2), leaving the line to the one that names the
        samples (lib.cli.run prints one line for the job)."""
        bad = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(bad)
        if bad.item() == 0:
            return
        if torch.isfinite(loss).item():
            raise SystemExit(2)
        samples = "; ".join(dataset.describe(j) for j in indices.tolist())
        raise FloatingPointError(f"non-finite loss ({loss.item()}) at epoch {self.epoch}, batch {batch}: {samples}. "
                                 f"The last complete checkpoint is in {self.checkpoint_dir}")

    def _log_epoch(self, stats: dict) -> None:
        if self.writer is None:
            return
        for k, v in stats.items():
            self.writer.add_scalar(f"epoch/{k}", v, self.epoch)
        for k, v in self.visuals.items():  # (T-1, C, h, w) of one sample: frames side by side
            images = v.float().cpu()
            if k == "frame":
                images = images / 255.0
            else:  # masks, predictions, Δ: scaled to [0, 1] for display
                images = (images - images.min()) / (images.max() - images.min() + 1e-8)
            self.writer.add_image(f"images/{k}", torch.cat(list(images), dim=-1), self.epoch)
        self.writer.flush()

    def _average_buffers(self) -> None:
        """DDP keeps the parameters equal; the batch-norm running statistics each process
        collected on its own batches are averaged, so the checkpoint reflects all of them and
        every process continues from the same state."""
        if self.world_size == 1:
            return
        with torch.no_grad():
            for buffer in self.step.network.buffers():
                if buffer.is_floating_point():
                    dist.all_reduce(buffer)
                    buffer /= self.world_size

    def _check_replicas(self) -> None:
        """All processes must end with the same weights (parameters and batch-norm statistics):
        rank 0 compares every process's copy with its own, exactly."""
        if self.world_size == 1:
            return
        flat = torch.cat([t.detach().reshape(-1).double() for t in self.step.network.state_dict().values()])
        flat = flat.to(self.device)  # nccl gathers CUDA tensors
        gathered = [torch.zeros_like(flat) for _ in range(self.world_size)]
        dist.all_gather(gathered, flat)
        if self.rank == 0:
            diffs = [(g - gathered[0]).abs().max().item() for g in gathered]
            same = all(d == 0 for d in diffs)
            print(f"weights of {self.world_size} processes, largest difference to rank 0: {diffs} -> "
                  f"{'identical' if same else 'DIFFERENT'}", flush=True)
            if not same:
                raise RuntimeError("processes ended with different weights")

