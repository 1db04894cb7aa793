"""Read-ahead of a fixed schedule of tensors on a background thread (``Prefetcher``)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lata.io.checkpoints import Checkpoint

PREFETCH_BYTES = 512 << 20  # how far the read-ahead thread runs ahead of its consumer


class Prefetcher:
    """Reads ahead of a consumer that walks a fixed schedule of tensors.

    ``schedule[i]`` lists the (checkpoint, tensor) pairs that step i reads. A background thread
    asks the kernel for the bytes of the coming steps (``Checkpoint.prefetch``) while the
    consumer computes, staying at most ``budget`` bytes ahead of it; ``advance(i)`` says the
    consumer is at step i. Prefetching never changes what is read, only when: results are
    identical with it on or off.

    Decision: when every scheduled tensor is in the page cache already, no thread is started:
    mapping pages ahead then costs what the consumer's page faults would, and the extra thread
    only competes with the compute (slower on a warm cache: docs/performance.md).
    """

    def __init__(self, schedule: list[list[tuple["Checkpoint", str]]], budget: int = PREFETCH_BYTES,
                 enabled: bool = True):
        self.schedule = schedule
        self.sizes = [sum(c.nbytes(n) for c, n in step) for step in schedule]
        self.budget = budget
        self._position = 0
        self._stop = False
        self._cond = threading.Condition()
        self._thread = None
        if enabled and schedule and not all(c.cached([n], samples=2) for step in schedule for c, n in step):
            self._thread = threading.Thread(target=self._run, name="lata-prefetch", daemon=True)
            self._thread.start()

    def advance(self, position: int) -> None:
        with self._cond:
            self._position = position
            self._cond.notify()

    def _run(self) -> None:
        ahead = 0  # bytes of steps [position, j) already asked for
        j = 0
        while j < len(self.schedule):
            with self._cond:
                while not self._stop and j > self._position and ahead + self.sizes[j] > self.budget:
                    self._cond.wait()
                    ahead = sum(self.sizes[max(self._position, 0):j])
                if self._stop:
                    return
                if j < self._position:  # the consumer overtook us: skip what it has read
                    j = self._position
                    ahead = 0
                    continue
            try:
                for ckpt, name in self.schedule[j]:
                    ckpt.prefetch([name])
                if self._position > j:  # the consumer finished step j meanwhile: unmap it again
                    for ckpt, name in self.schedule[j]:
                        ckpt.release([name])
            except OSError:
                return  # prefetching is advisory; the consumer reads whatever happens here
            ahead += self.sizes[j]
            j += 1

    def close(self) -> None:
        if self._thread is not None:
            with self._cond:
                self._stop = True
                self._cond.notify()
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
