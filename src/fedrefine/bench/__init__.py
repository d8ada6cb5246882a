"""Benchmark sweeps (``fedrefine bench``): sender subsets x routes x query modes, with reports and plots."""

from fedrefine.bench.runner import BenchSweep, FuserTraining
from fedrefine.bench.sweep import Cell, expand_cells, sender_subsets

__all__ = ["BenchSweep", "Cell", "FuserTraining", "expand_cells", "sender_subsets"]
