"""The server's worst-case memory for given settings: the sum of the budgets it enforces.

    total = baseline                                   interpreter, libraries, gRPC, one idle ORT session
          + max_decode_bytes                           decoding admitted at once (headers estimate each image)
          + max_concurrent_rpcs x max_message_bytes x RECEIVE_COPIES   the calls' messages as received
          + max(max_message_memory, max_message_bytes x GROWTH_COPIES)   what parsing and converting them grows
          + models x max_queue_bytes                   each version's batch queue
          + models x model_instances x ORT_RUN_BYTES   the batches each version runs at once
          + models x (model_instances - 1) x SESSION_COPIES x model file size
                                                       the extra sessions of --instance-sessions separate

A message is received (gRPC's buffer and its Python bytes) before any code of ours runs, so what
received messages take is bounded only by the number of calls and the message size. What it grows
into beyond that (protobuf's parse, the servicer's copies) is reserved on the message memory budget
before it is parsed (``tlserve.server.message_memory``), ``GROWTH_COPIES`` bytes per message byte,
and that budget always admits one message: hence the ``max``.

Each term is a limit the server enforces before the work it pays for starts (see docs/serving.md,
"Memory budget"); the constants are measured (``benchmarks/hostile_memory.py`` prints the peak RSS
against this figure). ``tlserve serve --print-memory-budget`` prints it for the flags given.
"""

from __future__ import annotations

from dataclasses import dataclass

from tlserve.server.settings import Settings

MIB = 1 << 20
# RSS of `tlserve serve` at rest with the demo model (MobileNetV2, 64 px; its session is 37 MiB) loaded
# and warmed up: 101-130 MiB measured.
BASELINE_BYTES = 160 * MIB
# One call's message lives as gRPC's receive buffer, its bytes, the parsed protobuf and what the servicer
# takes out of it. Measured peaks per message byte: raw tensors and images 3-5x; typed OIP `uint_contents`
# 10.4x (protobuf stores each 1-byte value in 4 bytes, and its arena keeps the array's earlier copies).
# Messages that would grow more (empty embedded messages, 64-bit packed values) are refused before
# they are parsed (tlserve.server.wire).
MESSAGE_COPIES = 10
# Of those, what a call's message takes before our code sees it: core's receive buffers, the bytes object
# the Cython layer copies them into (it lives until the call ends), and what glibc's arenas keep of them.
# Measured with 32 and 64 callers each resending a 4 MB message (benchmarks/hostile_memory.py --wide):
# peak RSS above rest 3.3-3.6x the messages in flight, whether --max-message-memory was 256 or 32 MiB.
# 3 here, as the rest of those peaks fits in the message memory term, which such calls do not fill.
RECEIVE_COPIES = 3
# The rest, reserved per message byte on the message memory budget before the message is parsed.
GROWTH_COPIES = MESSAGE_COPIES - RECEIVE_COPIES
# ORT's working set for one batch of 32 rows of the demo model, measured: 17 MiB (it grows with the
# batch and the input's pixels: about 200 MiB for a 224 px MobileNetV2).
ORT_RUN_BYTES = 64 * MIB
# One more session of the same file (--instance-sessions separate) holds its weights again, some of them
# prepacked a second time: +30 MiB measured per extra session of a 13.6 MiB MobileNetV2 file (224 px,
# warmed up with one row), hence twice the file's size.
SESSION_COPIES = 2
# The model file's size when the caller does not know it (MobileNetV2's file is 13.6 MiB).
MODEL_FILE_BYTES = 16 * MIB


@dataclass(frozen=True)
class MemoryBudget:
    """The worst case, term by term (bytes), and the settings behind each term."""

    parts: dict[str, int]
    formulas: dict[str, str]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def table(self) -> str:
        width = max(len(name) for name in self.parts)
        lines = [
            f"{name:<{width}}  {value / MIB:8.0f} MiB  {self.formulas[name]}" for name, value in self.parts.items()
        ]
        lines.append(f"{'total':<{width}}  {self.total / MIB:8.0f} MiB")
        return "\n".join(lines)


def memory_budget(settings: Settings, models: int = 1, model_bytes: int = MODEL_FILE_BYTES) -> MemoryBudget:
    """The process's worst case for ``settings`` with ``models`` loaded versions whose largest file is
    ``model_bytes``; ValueError when a term is unbounded (``--max-concurrent-rpcs 0``)."""
    if settings.max_concurrent_rpcs == 0:
        raise ValueError("no memory bound: --max-concurrent-rpcs 0 lets every call in; set a limit")
    received = settings.max_concurrent_rpcs * settings.max_message_bytes * RECEIVE_COPIES
    growth = max(settings.max_message_memory, settings.max_message_bytes * GROWTH_COPIES)
    instances = settings.model_instances
    parts = {
        "baseline": BASELINE_BYTES,
        "decoding": settings.max_decode_bytes,
        "received messages": received,
        "message memory": growth,
        "batch queues": models * settings.max_queue_bytes,
        "inference": models * instances * ORT_RUN_BYTES,
    }
    formulas = {
        "baseline": "interpreter, libraries, one idle session (measured)",
        "decoding": "--max-decode-bytes",
        "received messages": f"--max-concurrent-rpcs x --max-message-bytes x {RECEIVE_COPIES}",
        "message memory": f"--max-message-memory (at least one message: --max-message-bytes x {GROWTH_COPIES})",
        "batch queues": f"{models} model(s) x --max-queue-bytes",
        "inference": f"{models} model(s) x {instances} instance(s) x {ORT_RUN_BYTES // MIB} MiB, a batch's run "
        "(measured)",
    }
    if instances > 1 and settings.instance_sessions == "separate":
        parts["extra sessions"] = models * (instances - 1) * SESSION_COPIES * model_bytes
        formulas["extra sessions"] = (
            f"{models} model(s) x {instances - 1} more session(s) x {SESSION_COPIES} x {model_bytes / MIB:.0f} MiB "
            "(model file)"
        )
    return MemoryBudget(parts=parts, formulas=formulas)
