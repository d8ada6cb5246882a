"""Fusers F[i->j]: trainable maps from a sender's KV cache into a receiver's cache space, and their store.

- :mod:`~fedrefine.fuser.config`: :class:`FuserConfig` and the layer map;
- :mod:`~fedrefine.fuser.layers`: the blocks of one receiver layer's fuser (K and V streams, gate);
- :mod:`~fedrefine.fuser.fuser`: :class:`Fuser`, every layer of one ordered pair;
- :mod:`~fedrefine.fuser.stacked`: inference over every open layer at once (stacked weights);
- :mod:`~fedrefine.fuser.files`: weights and metadata on disk, checked on the way in;
- :mod:`~fedrefine.fuser.registry`: the fusers of a federation's ordered pairs, keyed by exact identity.
"""

from fedrefine.fuser.config import FuseAt, FuserConfig, FusionMode, LayerMapKind, layer_map
from fedrefine.fuser.files import (
    METADATA_FILE,
    WEIGHTS_FILE,
    FuserFileError,
    FuserPairMismatchError,
    read_weights,
    write_weights,
)
from fedrefine.fuser.fuser import Fuser, fuser_parameter_count
from fedrefine.fuser.layers import ConcreteGate
from fedrefine.fuser.registry import FuserRegistry, MissingFuserError

__all__ = [
    "METADATA_FILE", "WEIGHTS_FILE", "ConcreteGate", "FuseAt", "Fuser", "FuserConfig", "FuserFileError",
    "FuserPairMismatchError", "FuserRegistry", "FusionMode", "LayerMapKind", "MissingFuserError", "fuser_parameter_count",
    "layer_map", "read_weights", "write_weights",
]
