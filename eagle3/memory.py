"""Measuring memory: the peak resident memory of this process during a block of work.

Used by the benchmarks, the rehearsal and a few tests. On the CPU this is the honest number a
user's machine sees (torch's CPU allocator has no peak counter); on a GPU the benchmarks use
``torch.cuda.max_memory_allocated`` instead.
"""

from __future__ import annotations

import gc
import threading
import time

import psutil


class PeakRSS:
    """Peak resident memory of this process during a ``with`` block (sampled every 5 ms).

    ``delta_gib``: the peak minus the resident memory when the block started; ``peak_gib``:
    the peak itself. A sampler can miss a spike shorter than 5 ms; allocations of the size
    that matter here (tensors of 100 MB and up) live longer than that.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.process = psutil.Process()
        self.base = self.process.memory_info().rss
        self.peak = self.base
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def delta_gib(self) -> float:
        return (self.peak - self.base) / 2**30

    @property
    def peak_gib(self) -> float:
        return self.peak / 2**30
