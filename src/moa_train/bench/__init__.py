"""``moa-bench``: speed and memory of the MoA variants, as ratios to a baseline timed in the same process."""

from moa_train.bench.runner import main

__all__ = ["main"]
