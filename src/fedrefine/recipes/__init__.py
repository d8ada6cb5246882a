"""FedRefine's LightningModules: one pair (C2C), both directions of a pair (Co-C2C), a federation receiver."""

from fedrefine.recipes.base import FusionModule
from fedrefine.recipes.c2c import C2CModule
from fedrefine.recipes.co_c2c import CoC2CModule
from fedrefine.recipes.federation import FederationModule

__all__ = ["C2CModule", "CoC2CModule", "FederationModule", "FusionModule"]
