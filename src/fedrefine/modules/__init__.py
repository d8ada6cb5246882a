"""FedRefine's LightningModules: one pair (C2C), both directions of a pair (Co-C2C), a federation receiver."""

from fedrefine.modules.base import FusionModule
from fedrefine.modules.co_c2c import CoC2CModule
from fedrefine.modules.federation import FederationModule
from fedrefine.modules.pair import C2CModule

__all__ = ["C2CModule", "CoC2CModule", "FederationModule", "FusionModule"]
