"""Fusion: how senders' KV caches enter a receiver.

- :mod:`~fedrefine.fusion.encoding`: prompts encoded (and aligned) for the receiver and each sender;
- :mod:`~fedrefine.fusion.sender_kv`: a sender's K/V taken out of its rotary frame;
- :mod:`~fedrefine.fusion.residual` / :mod:`~fedrefine.fusion.concat`: the two strategies;
- :mod:`~fedrefine.fusion.gating`: the network weighing the receiver's own cache against each sender;
- :mod:`~fedrefine.fusion.sender_gate`: the network weighing each sender by what it sent;
- :mod:`~fedrefine.fusion.gate_files`: a saved gating network loaded, whichever kind;
- :mod:`~fedrefine.fusion.sending`: how the selected senders deliver (local prefills, remote calls, concurrently);
- :mod:`~fedrefine.fusion.receiver`: the receiver: send once, fuse, then forward, read the prompt or generate.
"""

from fedrefine.fusion.batch import FusionBatch, FusionExample, SenderBatch
from fedrefine.fusion.concat import ConcatFusion
from fedrefine.fusion.encoding import PromptEncoder, encode_response
from fedrefine.fusion.gate_files import gate_saved_in, load_gate
from fedrefine.fusion.gating import SourceGate
from fedrefine.fusion.receiver import Fused, FusedReceiver, ReceiverOutput, choose_strategy
from fedrefine.fusion.residual import Combine, ResidualFusion
from fedrefine.fusion.sender_gate import SenderStateGate
from fedrefine.fusion.sender_kv import SenderKV
from fedrefine.fusion.sending import Sending, SendOutcome
from fedrefine.fusion.strategy import FusionInput, FusionStrategy, ReceiverContext

__all__ = [
    "Combine", "ConcatFusion", "Fused", "FusedReceiver", "ReceiverOutput", "FusionBatch", "FusionExample", "FusionInput", "FusionStrategy",
    "PromptEncoder", "ReceiverContext", "ResidualFusion", "SendOutcome", "SenderBatch", "SenderKV", "SenderStateGate", "Sending",
    "SourceGate",
    "choose_strategy", "encode_response", "gate_saved_in", "load_gate",
]
