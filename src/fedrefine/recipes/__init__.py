"""FedRefine's Lightning recipes, each readable top-down in its own file (setup -> training_step -> loss -> log ->
export), on one shared base:

- :mod:`~fedrefine.recipes.c2c`: one pair's fuser (C2C);
- :mod:`~fedrefine.recipes.co_c2c`: both directions of a pair in one run (Co-C2C);
- :mod:`~fedrefine.recipes.federation`: one receiver of a federation, its gating network (and fusers);
- :mod:`~fedrefine.recipes.base`: frozen participants, evaluation hooks, optimizer, the response loss;
- :mod:`~fedrefine.recipes.trainer_cli`: ``fedrefine fit / validate / test / predict`` (LightningCLI).
"""

from fedrefine.recipes.base import FusionModule
from fedrefine.recipes.c2c import C2CModule
from fedrefine.recipes.co_c2c import CoC2CModule
from fedrefine.recipes.federation import FederationModule

__all__ = ["C2CModule", "CoC2CModule", "FederationModule", "FusionModule"]
