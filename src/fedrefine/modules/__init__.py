"""FedRefine's LightningModules."""

from fedrefine.modules.base import FusionModule
from fedrefine.modules.pair import C2CModule

__all__ = ["C2CModule", "FusionModule"]
