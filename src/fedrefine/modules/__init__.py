"""FedRefine's LightningModules: one pair (C2C), both directions of a pair (Co-C2C), a federation receiver."""

from fedrefine.modules.co_c2c import CoC2CModule
from fedrefine.modules.federation_receiver import FederationModule
from fedrefine.modules.fusion_module import FusionModule
from fedrefine.modules.pair import C2CModule

__all__ = ["C2CModule", "CoC2CModule", "FederationModule", "FusionModule"]
