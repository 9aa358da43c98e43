"""Hostile-caller fuzzing at scale: the strategies of tests/server/test_fuzz.py, many more examples.

    python benchmarks/fuzz_hostile.py                          # 20,000 examples, stock MobileNetV2 at 64 px
    python benchmarks/fuzz_hostile.py --examples 2000 --repository DIR

Starts ``tlserve serve`` as its own process on 127.0.0.1 (CPU) and sends it requests drawn by
hypothesis from valid ones (real photos, valid tensors) and then mutated, through the task API
and the Open Inference Protocol, checking health after every call. Each example's RPC group is
drawn with the weights the test splits its examples by; ``--wide`` also draws the cases the test keeps apart
as wide (1 MB strings, ranks up to 70). Prints, per RPC: requests tried and every status seen;
then the server's peak RSS (VmHWM), the slowest health check, and each unexpected answer (a
status no caller mistake may get, a long or echoing message, health not SERVING) with the case
that caused it. Unless ``--no-repro``, groups with a problem run again so that hypothesis
shrinks one and prints its falsifying example. Stops by itself after ``--seconds`` (plus at
most ``--repro-seconds`` per failing group).
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
from bench_serving import export_stock, model_of, start_server
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "server"))
import hostile  # noqa: E402  (shared with the tests)

log = logging.getLogger("fuzz_hostile")

LIMITS = {"max_images": 4, "max_image_bytes": 2_000_000, "max_pixels": 4_000_000, "max_message_bytes": 16 << 20}


class TimeUp(BaseException):
    """Raised inside a hypothesis run when ``--seconds`` is spent: hypothesis lets it through at once."""


def kind_of(problem: str) -> str:
    """A problem's kind, for grouping: numbers and quoted text left out."""
    return re.sub(r"'[^']*'|\"[^\"]*\"|\d+", "_", problem)[:90]


class Run:
    """One benchmark run: the fuzzer, the clock, and the first case of each kind of problem."""

    def __init__(self, fuzzer: hostile.Fuzzer, seconds: float) -> None:
        self.fuzzer = fuzzer
        self.deadline = time.monotonic() + seconds
        self.examples = 0
        self.found: dict[str, tuple[int, str, hostile.Case]] = {}  # kind -> (count, first problem, case)
        self.group_problems: Counter[str] = Counter()

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TimeUp()
        self.examples += 1

    def collect(self, strategy: st.SearchStrategy, examples: int, seed: int) -> None:
        """Phase 1: every example, problems recorded, nothing raised (no shrinking)."""

        @settings(max_examples=examples, phases=[Phase.generate], **SETTINGS)
        @given(case=strategy)
        def explore(case: hostile.Case) -> None:
            self.tick()
            _, found = self.fuzzer.run(case)
            for problem in found:
                kind = kind_of(problem)
                count, first, example = self.found.get(kind, (0, problem, case))
                self.found[kind] = (count + 1, first, example)
                self.group_problems[hostile.GROUP_OF[case.rpc]] += 1

        seeded(explore, seed)()

    def reproduce(self, strategy: st.SearchStrategy, examples: int, seed: int, seconds: float) -> None:
        """Phase 2: the group's examples, raising, so hypothesis shrinks one and prints it."""
        deadline = time.monotonic() + seconds

        @settings(max_examples=examples, phases=[Phase.generate, Phase.shrink], **SETTINGS)
        @given(case=strategy)
        def falsify(case: hostile.Case) -> None:
            if time.monotonic() > deadline:
                raise TimeUp()
            self.fuzzer.check(case)

        try:
            seeded(falsify, seed)()
            print("  (no failure found again)")
        except AssertionError as exc:  # hypothesis attaches the falsifying example as a note
            notes = "\n".join(getattr(exc, "__notes__", []))
            print(f"  {str(exc).splitlines()[0]}\n  {notes[:2000]}\n", flush=True)


SETTINGS = dict(
    deadline=None,
    database=None,
    derandomize=False,
    print_blob=False,
    suppress_health_check=list(HealthCheck),
)


def seeded(test, seed: int):
    from hypothesis import seed as hypothesis_seed

    return hypothesis_seed(seed)(test)


def table(fuzzer: hostile.Fuzzer) -> str:
    """Per RPC: calls, requests (a stream's messages each), then each call's final status and each
    in-band stream error."""
    codes = sorted({code for _, code in fuzzer.codes}, key=lambda c: (c != "OK", c))
    lines = [
        "| rpc | calls | requests | " + " | ".join(codes) + " |",
        "|---|---:|---:|" + "---:|" * len(codes),
    ]
    for rpc in (*hostile.TASK_RPCS, *hostile.OIP_RPCS):
        if fuzzer.calls[rpc]:
            cells = [str(fuzzer.codes.get((rpc, code), "")) for code in codes]
            lines.append(f"| {rpc} | {fuzzer.calls[rpc]} | {fuzzer.tried[rpc]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20_000, help="examples in all, mixed over the RPC groups")
    parser.add_argument("--seconds", type=float, default=540.0, help="stop after this long, whatever is left")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repository", type=Path, help="fuzz this repository's first model (default: export one)")
    parser.add_argument("--wide", action="store_true", help="also the wide cases (1 MB strings, rank 70 shapes)")
    parser.add_argument("--no-repro", action="store_true", help="do not rerun failing groups to shrink an example")
    parser.add_argument("--repro-seconds", type=float, default=60.0, help="time for each failing group's rerun")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the server process
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    import skimage.data

    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        repository = args.repository or export_stock("mobilenet_v2", 64, "IMAGENET1K_V1", Path(tmp) / "models")
        model_of(repository)  # fails early on an empty repository
        extra = [f"--{k.replace('_', '-')}={v}" for k, v in LIMITS.items()]
        extra += ["--decode-threads=2", "--intra-op-threads=1", "--max-queue-delay-ms=1"]
        process, address, _ = start_server(repository, extra)
        try:
            with grpc.insecure_channel(address) as channel:
                return fuzz(channel, process, (str(repository.resolve()), tmp), args, skimage.data.data_dir)
        finally:
            process.terminate()
            process.wait(30)


def fuzz(channel: grpc.Channel, process, secrets: tuple[str, ...], args: argparse.Namespace, data_dir: str) -> int:
    target = hostile.discover(channel, LIMITS, secrets)
    seeds = hostile.load_seeds(data_dir, target.input_size)
    fuzzer = hostile.Fuzzer(channel, target, lambda: hostile.rss_bytes(process.pid), hostile.RSS_BOUND)
    run = Run(fuzzer, args.seconds)
    strategies = hostile.groups(seeds, target, hostile.WIDE if args.wide else hostile.MAIN)
    started = time.monotonic()
    try:
        run.collect(hostile.mixed(strategies), args.examples, args.seed)
    except TimeUp:
        log.warning("stopped after %.0f s (--seconds)", args.seconds)
    elapsed = time.monotonic() - started
    peak = hostile.rss_bytes(process.pid, "VmHWM")
    print(f"\n{run.examples} examples in {elapsed:.0f} s against {target.model}/{target.version}\n")
    print(table(fuzzer))
    print(
        f"\nserver RSS: {fuzzer.rss_start / 2**20:.0f} MiB at start, peak {peak / 2**20:.0f} MiB "
        f"(bound {fuzzer.rss_bound / 2**20:.0f} MiB); slowest health check {fuzzer.health_max * 1000:.1f} ms"
    )
    if process.poll() is not None:
        print(f"\nthe server EXITED with {process.returncode}")
        return 1
    if not run.found:
        print("\nno unexpected answer")
        return 0
    print(f"\n{sum(c for c, _, _ in run.found.values())} unexpected answers, {len(run.found)} kinds:")
    for count, first, case in sorted(run.found.values(), key=lambda item: -item[0]):
        print(f"- {count} x {first}\n  first case: {hostile.brief_value(case, 600)}")
    if not args.no_repro:
        print(f"\nshrinking one example per failing group ({args.repro_seconds:.0f} s each at most):")
        for name in [n for n in strategies if run.group_problems[n]]:
            print(f"{name}:", flush=True)
            try:
                run.reproduce(strategies[name], args.examples, args.seed, args.repro_seconds)
            except TimeUp:
                print("  (out of time)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
