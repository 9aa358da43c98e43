"""A model version's execution instances (``--model-instances``): N ONNX Runtime sessions of one file,
each lent to one run at a time, or one session whose ``run`` several threads call at once (ORT allows
concurrent runs of a session). The batcher decides how many runs happen at once; this only lends sessions.
"""

from __future__ import annotations

import queue
from collections.abc import Sequence

import numpy as np

from tlserve.server.runtime import Runtime


class Instances:
    """The sessions of one version; ``run`` borrows a free one (blocking, in the executor)."""

    def __init__(self, runtimes: Sequence[Runtime]) -> None:
        if not runtimes:
            raise ValueError("a model needs at least one session")
        self.runtimes = list(runtimes)
        self._free: queue.SimpleQueue[Runtime] = queue.SimpleQueue()
        for runtime in self.runtimes:
            self._free.put(runtime)

    @property
    def sessions(self) -> int:
        return len(self.runtimes)

    def run(self, input_name: str, batch: np.ndarray) -> dict[str, np.ndarray]:
        if len(self.runtimes) == 1:  # one session, shared by however many runs the batcher allows
            return self.runtimes[0].run(input_name, batch)
        runtime = self._free.get()  # never waits long: the batcher runs at most one batch per session
        try:
            return runtime.run(input_name, batch)
        finally:
            self._free.put(runtime)
