"""The most any Python gRPC server could serve on this machine, from one sitting's cells (bench_serving --floor).

Two bounds, each from figures measured in the same sitting:

- **Round trips.** One caller waits for the compute and then for a round trip, one after the other.
  The bare floor's round trip (peers/grpc_floor.py: parse the request, answer fixed bytes, no model)
  is the least any server adds. So at one caller no server beats ``1 / (1/raw + 1/floor)`` img/s.
- **CPU.** With every core busy, each image costs its compute, plus the floor's server CPU per call,
  plus the client's CPU per call (the benchmark's client shares the cores). So no server beats
  ``cores / (compute + floor server + floor client)`` img/s. The compute is the cheaper of raw ORT's CPU
  per image with its spinning off and ``cores / raw img/s`` (all that raw, spinning, could have spent).

The ceiling is the lower of the two; ``tlserve ÷ ceiling`` says how much of what is reachable we reach.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class Measured(Protocol):
    """What a bench_serving Cell carries that the ceiling needs."""

    mode: str
    concurrency: int
    images_per_s: float
    server_cpu_ms: float  # served: the server's CPU per call
    bench_cpu_ms: float  # served: the client's CPU per call; raw: ORT's CPU per image


@dataclass(frozen=True)
class Ceiling:
    concurrency: int
    images_per_s: float
    bound: str  # "round trip" or "CPU"
    compute_ms: float  # CPU per image of the compute alone
    floor_cpu_ms: float  # the floor's server + client CPU per call


def ceiling(raw: Measured, floor: Measured, cores: int) -> Ceiling:
    """The lower of the round-trip bound (one caller only) and the CPU bound at ``raw``'s concurrency."""
    floor_cpu = floor.server_cpu_ms + floor.bench_cpu_ms
    compute = min(raw.bench_cpu_ms or float("inf"), cores * 1e3 / raw.images_per_s)
    by_cpu = cores * 1e3 / (compute + floor_cpu)
    bound, best = "CPU", by_cpu
    if raw.concurrency == 1:
        by_round_trip = 1 / (1 / raw.images_per_s + 1 / floor.images_per_s)
        if by_round_trip < by_cpu:
            bound, best = "round trip", by_round_trip
    return Ceiling(raw.concurrency, best, bound, compute, floor_cpu)


def ceiling_table(cells: list[Measured], raw_mode: str, floor_mode: str, served: list[str], cores: int) -> str:
    """Per concurrency: the ceiling, raw ÷ ceiling and each ``served`` mode ÷ ceiling (markdown)."""
    by = {(c.mode, c.concurrency): c for c in cells}
    header = "| concurrency | compute CPU ms per image | floor CPU ms per call (server + client) | ceiling img/s "
    header += "| bound | ceiling ÷ raw | " + " | ".join(f"{m} ÷ ceiling" for m in served) + " |"
    lines = [header, "|---:|---:|---:|---:|---|---:|" + "---:|" * len(served)]
    for c in sorted({c.concurrency for c in cells}):
        top = ceiling(by[raw_mode, c], by[floor_mode, c], cores)
        shares = " | ".join(f"{by[m, c].images_per_s / top.images_per_s:.2f}" for m in served if (m, c) in by)
        lines.append(
            f"| {c} | {top.compute_ms:.2f} | {top.floor_cpu_ms:.2f} | {top.images_per_s:.1f} | {top.bound} | "
            f"{top.images_per_s / by[raw_mode, c].images_per_s:.2f} | {shares} |"
        )
    return "\n".join(lines)
