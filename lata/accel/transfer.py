"""Moving whole tensors between the checkpoints and an accelerator, ahead of the compute.

The staged path of both streaming passes (``lata.analysis``, ``lata.engine``), the default on
an accelerator. A loader thread walks a fixed schedule of tensors: it reads each tensor's bytes
with ``pread`` into page-locked host memory (pieces of every tensor of a step at once, on
reader threads), copies them to the device on its own CUDA stream (``non_blocking``), and
hands the consumer whole device tensors one step at a time. So reading, host-to-device copies
and the compute of the previous tensor overlap, and the GPU sees one copy and one chain of
kernels per tensor instead of thousands of small slices. ``HostCopies`` copies results back on
a second stream, which overlaps the next tensor's compute.

Memory stays bounded: at most ``ahead_bytes`` of tensors (and at least one step) are loaded
ahead of the step being computed; no model is ever whole on the device or in pinned memory.

With ``device="cpu"`` the same code runs with plain host memory and no streams: the tests run
the staged path this way, and it gives the same bits as the sliced path.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch

from lata.accel.compute import auto_threads

#: Decision: tensors loaded ahead of the one being computed, in bytes as stored (at least one
#: step is loaded ahead whatever its size). A step is one tensor of every model it reads: 2 GiB
#: holds a step or two of a 70B model's largest block tensors (about 1.4 GB for three models),
#: while the device also holds the current step and its float32 temporaries.
AHEAD_BYTES = 2 << 30


def _is_accelerator(device: torch.device) -> bool:
    return device.type == "cuda"


class DeviceLoader:
    """Loads ``schedule[i]`` (a list of (checkpoint, tensor name) pairs) onto ``device`` ahead
    of the consumer, who takes the steps in order with ``take(i)``.

    ``take`` returns the step's tensors, in schedule order, in their stored dtype, on ``device``
    and ready for the current stream. A failure in the loader (a truncated file, say) is raised
    by the ``take`` of the step that failed. Close (or use as a context manager) to stop it.
    """

    def __init__(self, schedule: Sequence[Sequence[tuple]], device: str | torch.device,
                 ahead_bytes: int = AHEAD_BYTES, threads: int | None = None):
        self.schedule = [list(step) for step in schedule]
        self.device = torch.device(device)
        self.sizes = [sum(c.nbytes(n) for c, n in step) for step in self.schedule]
        self.ahead_bytes = ahead_bytes
        self._accelerator = _is_accelerator(self.device)
        self._stream = torch.cuda.Stream(self.device) if self._accelerator else None
        self._ready: dict[int, tuple] = {}
        self._taken = 0  # the step the consumer is at
        self._stop = False
        self._cond = threading.Condition()
        self._readers = ThreadPoolExecutor(max(1, threads or auto_threads()), thread_name_prefix="lata-read")
        self._thread = threading.Thread(target=self._run, name="lata-load", daemon=True)
        self._thread.start()

    def _loaded_ahead(self) -> int:
        return sum(self.sizes[j] for j in self._ready if j > self._taken)

    def _run(self) -> None:
        for j in range(len(self.schedule)):
            with self._cond:
                # load step j once the consumer is within one step of it, or it fits the budget
                while not self._stop and j > self._taken + 1 and self._loaded_ahead() + self.sizes[j] > self.ahead_bytes:
                    self._cond.wait()
                if self._stop:
                    return
            try:
                loaded = (self._load(self.schedule[j]), None)
            except BaseException as exc:  # handed to the consumer's take(j)
                loaded = (None, exc)
            with self._cond:
                self._ready[j] = loaded
                self._cond.notify_all()
            if loaded[1] is not None:
                return

    def _load(self, step: list[tuple]) -> tuple[list[torch.Tensor], object]:
        hosts, reads = [], []
        for ckpt, name in step:  # every piece of every tensor of the step, on the reader threads
            tensor, pieces = ckpt.read_later(name, pin=self._accelerator)
            hosts.append(tensor)
            reads += pieces
        for _ in self._readers.map(lambda read: read(), reads):
            pass
        if not self._accelerator:
            return [h.to(self.device) for h in hosts], None
        with torch.cuda.stream(self._stream):
            tensors = [h.to(self.device, non_blocking=True) for h in hosts]
            done = torch.cuda.Event()
            done.record(self._stream)
        return tensors, done

    def take(self, i: int) -> list[torch.Tensor]:
        """Step ``i``'s tensors (steps are taken in order)."""
        with self._cond:
            self._taken = i
            self._cond.notify_all()
            while i not in self._ready:
                if not self._thread.is_alive():
                    raise RuntimeError(f"the tensor loader stopped before step {i}")
                self._cond.wait(timeout=1.0)
            loaded, error = self._ready.pop(i)
        if error is not None:
            raise error
        tensors, done = loaded
        if done is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            for t in tensors:  # the memory was allocated on the loader's stream: used on this one
                t.record_stream(stream)
        return tensors

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()
        self._readers.shutdown(cancel_futures=True)
        self._ready.clear()

    def __enter__(self) -> "DeviceLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HostCopies:
    """Copies device tensors to host memory on a side stream, handing each one back once the
    next has been started (so a copy overlaps the next tensor's compute). On the CPU, a no-op."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self._stream = torch.cuda.Stream(self.device) if _is_accelerator(self.device) else None
        self._pending: list[tuple] = []

    def put(self, key, tensor: torch.Tensor, host: torch.Tensor | None = None) -> list[tuple]:
        """Start copying the device tensor ``tensor`` into ``host`` (a new page-locked tensor if
        None); returns the (key, host tensor) pairs whose copies are complete, in order."""
        if self._stream is None or tensor.device.type == "cpu":
            return self.keep(key, tensor if host is None else host.copy_(tensor))
        if host is None:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            host.copy_(tensor, non_blocking=True)
            tensor.record_stream(self._stream)
            done = torch.cuda.Event()
            done.record(self._stream)
        self._pending.append((key, host, done))
        return self._complete(keep=1)

    def keep(self, key, tensor: torch.Tensor) -> list[tuple]:
        """Hand ``tensor`` back as it is, in its turn after the copies started before it."""
        self._pending.append((key, tensor, None))
        return self._complete(keep=1)

    def drain(self) -> list[tuple]:
        """The copies still in flight, once complete."""
        return self._complete(keep=0)

    def _complete(self, keep: int) -> list[tuple]:
        out = []
        while len(self._pending) > keep:
            key, host, done = self._pending.pop(0)
            if done is not None:
                done.synchronize()
            out.append((key, host))
        return out
