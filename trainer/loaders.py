"""DataLoaders, rebuilt every epoch from a per-epoch seed (so a resumed run draws the same batches)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, WeightedRandomSampler

from tlserve.trainer.data import ImageList, class_weights
from tlserve.trainer.distributed import DistContext


def train_loader(
    dataset: ImageList,
    batch_size: int,
    workers: int,
    seed: int,
    dist: DistContext,
    balance_sampler: bool = False,
    num_classes: int = 0,
) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    per_rank = (len(dataset) + dist.world_size - 1) // dist.world_size
    if balance_sampler:
        weights = class_weights(dataset.targets, num_classes)[torch.tensor(dataset.targets)]
        draws = torch.Generator().manual_seed(seed + 7_919 * dist.rank)  # each rank its own draws
        sampler = WeightedRandomSampler(weights.double(), per_rank, replacement=True, generator=draws)
    elif dist.enabled:
        sampler = DistributedSampler(dataset, dist.world_size, dist.rank, shuffle=True, seed=seed)
    else:
        sampler = None
    # drop a trailing batch of one: BatchNorm cannot train on a single image
    drop_last = per_rank % batch_size == 1
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=dist.device.type == "cuda",
        persistent_workers=False,
    )


def eval_loader(dataset: Dataset, batch_size: int, workers: int, dist: DistContext) -> DataLoader:
    """Every rank evaluates the whole set, so all ranks take the same early-stopping decisions."""
    return DataLoader(
        dataset, batch_size=batch_size * 2, shuffle=False, num_workers=workers, pin_memory=dist.device.type == "cuda"
    )
