"""The training loop: optimizer, scheduler, checkpoints, resume, TensorBoard, distributed.

The step (`trainers.gfrtm_step.GFRTMStep`) computes the loss; only this loop calls backward,
steps, clips and logs. Checkpoints are complete (model, optimizer, scheduler, epoch, args) and
written atomically by rank 0 after every epoch; a run resumes from the newest one.
"""
from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from dataset.training import TrainingSamples, epoch_samples
from models.checkpoint import load_network_state, network_state, read_checkpoint, save_checkpoint

from .gfrtm_step import GFRTMStep
from .tmcache import TargetModelCache

log = logging.getLogger(__name__)
SAMPLE_SIZE = 6  # frames per sample: the reference frame and 5 others


def checkpoint_files(directory: Path, name: str) -> list[Path]:
    """Complete checkpoints of a run, oldest to newest epoch."""
    pattern = re.compile(rf"{re.escape(name)}_ep(\d+)\.pth")
    found = [(int(m.group(1)), p) for p in directory.glob(f"{name}_ep*.pth") if (m := pattern.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


class Trainer:
    def __init__(self, step: GFRTMStep, optimizer: torch.optim.Optimizer, scheduler, sources: list,
                 cache: TargetModelCache, args, device: torch.device, checkpoint_dir: Path,
                 tensorboard_dir: Path, rank: int = 0, world_size: int = 1):
        self.step = step
        self.model = DistributedDataParallel(step) if world_size > 1 else step
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.sources = sources
        self.cache = cache
        self.args = args
        self.device = device
        self.checkpoint_dir = checkpoint_dir
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.writer = None
        if rank == 0:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            for stale in checkpoint_dir.glob(".*.tmp"):  # left by a run killed while saving
                stale.unlink()
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(tensorboard_dir))

    # Checkpoints -------------------------------------------------------------------------------

    def resume(self, path: Optional[Path] = None) -> None:
        """Continue from `path`, or from the newest checkpoint of this run if there is one."""
        if path is None:
            found = checkpoint_files(self.checkpoint_dir, self.args.name)
            if not found:
                return
            path = found[-1]
        ckpt = read_checkpoint(path)
        for key in ("optimizer", "scheduler", "epoch"):
            if key not in ckpt:
                raise ValueError(f"{path} is not a training checkpoint (no {key!r}); use --initPth to start from it")
        state, backbone, _ = network_state(ckpt)
        if backbone != self.step.network.backbone_name:
            raise ValueError(f"{path} was trained with {backbone}, this run uses "
                             f"{self.step.network.backbone_name} (--ftext)")
        load_network_state(self.step.network, state)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.epoch = int(ckpt["epoch"])
        if self.rank == 0:
            print(f"resumed from {path} (epoch {self.epoch}); continuing with epoch {self.epoch + 1}")

    def save(self, stats: dict) -> Optional[Path]:
        if self.rank != 0:
            return None
        path = self.checkpoint_dir / f"{self.args.name}_ep{self.epoch:04d}.pth"
        return save_checkpoint(path, self.step.network, optimizer=self.optimizer.state_dict(),
                               scheduler=self.scheduler.state_dict(), epoch=self.epoch, args=vars(self.args),
                               stats=stats)

    # Training ----------------------------------------------------------------------------------

    def _loader(self, dataset: TrainingSamples) -> DataLoader:
        if self.world_size > 1:
            sampler = DistributedSampler(dataset, self.world_size, self.rank, shuffle=True, seed=self.args.seed)
            sampler.set_epoch(self.epoch)
        else:
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(self.args.seed * 100003 + self.epoch))
        return DataLoader(dataset, batch_size=self.args.batch_size, sampler=sampler, num_workers=self.args.workers,
                          pin_memory=self.device.type == "cuda", persistent_workers=False)

    def train(self) -> dict:
        args = self.args
        last = {}
        while self.epoch < args.epochs:
            self.epoch += 1
            specs = epoch_samples(self.sources, args.seed, self.epoch, SAMPLE_SIZE)
            if args.samples_per_epoch:
                order = np.random.default_rng([args.seed, self.epoch, 1]).permutation(len(specs))
                specs = [specs[i] for i in order[:args.samples_per_epoch]]
            dataset = TrainingSamples(self.sources, specs, args.size)
            last = self._epoch(dataset)
            self.scheduler.step()
            if self.rank == 0:
                path = self.save(last)
                self._log_epoch(last)
                print(f"epoch {self.epoch}/{args.epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items())
                      + f" -> {path}")
            if self.world_size > 1:
                dist.barrier()
        self._check_replicas()
        if self.writer is not None:
            self.writer.close()
        return last

    def _epoch(self, dataset: TrainingSamples) -> dict:
        self.step.network.train()
        loader = self._loader(dataset)
        sums, count = {}, 0
        hits0, misses0 = self.cache.hits, self.cache.misses
        bar = tqdm(loader, desc=f"epoch {self.epoch}", unit="batch", disable=self.rank != 0, dynamic_ncols=True)
        for i, (images, labels, indices) in enumerate(bar):
            images = images.to(self.device).float()
            labels = labels.to(self.device).float()
            frames = [images[:, t] for t in range(images.shape[1])]
            masks = [labels[:, t] for t in range(labels.shape[1])]
            targets = []
            for b, index in enumerate(indices.tolist()):
                spec = dataset.specs[index]
                targets.append(self.cache.get(spec.sequence, spec.frames[0], spec.object_id, frames[0][b], masks[0][b]))
            loss, stats, visuals = self.model(frames, masks, targets, self.epoch)
            if not torch.isfinite(loss):
                batch = "; ".join(dataset.describe(j) for j in indices.tolist())
                raise FloatingPointError(f"non-finite loss ({loss.item()}) at epoch {self.epoch}, batch {i}: {batch}. "
                                         f"The last complete checkpoint is in {self.checkpoint_dir}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(self.step.network.parameters(), self.args.clip_grad)
            self.optimizer.step()

            stats["lr"] = self.optimizer.param_groups[0]["lr"]
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            count += 1
            bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['accuracy']:.3f}",
                            reuse=f"{stats['reuse_rate']:.2f}", refresh=False)
            if self.writer is not None:
                step = (self.epoch - 1) * len(loader) + i
                for k in ("loss", "loss_seg", "loss_diff", "loss_gp", "accuracy", "reuse_rate"):
                    self.writer.add_scalar(f"batch/{k}", stats[k], step)
            self._visuals = visuals
        averages = {k: v / max(count, 1) for k, v in sums.items()}
        looked_up = (self.cache.hits - hits0) + (self.cache.misses - misses0)
        averages["cache_hit_rate"] = (self.cache.hits - hits0) / looked_up if looked_up else math.nan
        return averages

    def _log_epoch(self, stats: dict) -> None:
        if self.writer is None:
            return
        for k, v in stats.items():
            self.writer.add_scalar(f"epoch/{k}", v, self.epoch)
        for k, v in getattr(self, "_visuals", {}).items():
            image = v[0].float()
            if k == "frame":
                image = image / 255.0
            else:  # masks, predictions, Δ: scaled to [0, 1] for display
                image = (image - image.min()) / (image.max() - image.min() + 1e-8)
            self.writer.add_image(f"images/{k}", image.cpu(), self.epoch)
        self.writer.flush()

    def _check_replicas(self) -> None:
        """All processes must end with the same weights; rank 0 reports it."""
        if self.world_size == 1:
            return
        checksum = torch.tensor([sum(p.double().sum().item() for p in self.step.network.parameters())],
                                dtype=torch.float64, device=self.device)
        gathered = [torch.zeros_like(checksum) for _ in range(self.world_size)]
        dist.all_gather(gathered, checksum)
        values = [g.item() for g in gathered]
        if self.rank == 0:
            same = all(v == values[0] for v in values)
            print(f"weight checksums of {self.world_size} processes: {values} -> "
                  f"{'identical' if same else 'DIFFERENT'}")
            if not same:
                raise RuntimeError("processes ended with different weights")


def setup_distributed(dev: Optional[str]) -> tuple[int, int, Optional[str]]:
    """(rank, world size, device) from torchrun's environment; (0, 1, dev) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, dev
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() and (dev is None or dev.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, f"cuda:{local_rank}" if use_cuda else "cpu"

