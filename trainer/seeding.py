"""Deterministic seeding: one seed per (run seed, epoch, rank), so a resumed run replays the same draws."""

from __future__ import annotations

import random

import numpy as np
import torch


def derive(seed: int, epoch: int = 0, rank: int = 0) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**31 - 1)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a fresh generator for samplers."""
    random.seed(seed)
    np.random.seed(seed % (2**32 - 1))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
