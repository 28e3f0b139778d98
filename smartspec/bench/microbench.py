"""Helpers of the in-process micro-benchmarks under bench/: an interval for a ratio of medians, and a
count of the reads that bring tensor values back to the host."""

from __future__ import annotations

import contextlib
import random
import statistics
from typing import Iterator

import torch

# Ways a tensor's values reach Python or numpy: on an accelerator each is a device-to-host transfer and
# a sync (nonzero too: its output size must be read back).
HOST_READS = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "__array__", "nonzero")


def bootstrap_ratio(num: list[float], den: list[float], rng: random.Random, draws: int = 2000) -> tuple[float, float]:
    """95% interval of median(num) / median(den), resampling the paired repeats."""
    n = len(num)
    ratios = []
    for _ in range(draws):
        pick = [rng.randrange(n) for _ in range(n)]
        ratios.append(statistics.median(num[i] for i in pick) / statistics.median(den[i] for i in pick))
    ratios.sort()
    return ratios[int(0.025 * draws)], ratios[int(0.975 * draws) - 1]


@contextlib.contextmanager
def counting_host_reads() -> Iterator[dict[str, int]]:
    """Counts, in the yielded dict's "reads", the host reads of tensor values (whatever the device) made
    inside the block, by wrapping the torch.Tensor methods that do them."""
    counts = {"reads": 0}
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(original):
        def read(self, *args, **kwargs):
            counts["reads"] += 1
            return original(self, *args, **kwargs)
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
