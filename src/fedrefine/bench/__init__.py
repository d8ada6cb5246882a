"""Benchmark sweeps (``fedrefine bench``): sender subsets x route families x query modes, with reports and plots."""

from fedrefine.bench.cells import expand_cells, sender_subsets
from fedrefine.bench.runner import BenchSweep, FuserTraining

__all__ = ["BenchSweep", "FuserTraining", "expand_cells", "sender_subsets"]
