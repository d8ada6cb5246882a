"""Fusers: trainable maps from a sender's KV cache into a receiver's cache space (C2C).

Per receiver layer, separately for keys and values (shapes (B, H, N, D))::

    h = FFN(W_in [s ; t] + b_in)                  trunk over sender s and receiver t
    p = W_out FFN^(L-2)(h) + b_out                projected cache   (B, H_t, N, D_t)
    w = sigmoid(W_w FFN(h) + b_w)                 per-token, per-head weight (B, H_t, N, 1)
    delta = g * w * p                             g: the layer's binary-concrete gate

and the receiver's cache becomes ``X_t + delta`` (residual fusion). In concat fusion (the
FedRefine paper's eq. 1 and 4) the trunk reads the sender alone and the projected cache
``w*p`` is placed ahead of the receiver's own cache, the gate scaling its values. Keys enter and leave
without rotary embedding: the caller removes each model's RoPE before and re-applies the
receiver's after, so models with different rotary bases are fused in a position-free space.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fedrefine.fuser.config import FuserConfig, layer_map
from fedrefine.fuser.files import (
    FORMAT_NAME,
    FORMAT_VERSION,
    METADATA_FILE,
    READABLE_VERSIONS,
    WEIGHTS_FILE,
    FuserFileError,
    FuserPairMismatchError,
    read_weights,
    write_weights,
)
from fedrefine.fuser.layers import LAYER_FUSERS, KeyFrame, LayerFuser, stream_inputs
from fedrefine.fuser.reference import ReferenceLayerFuser
from fedrefine.fuser.stacked import InferenceStacks, StackedLayers, StackedStream
from fedrefine.kv.stack import KVStack
from fedrefine.participants import ParticipantIdentity

#: The layer fuser of each (variant, mode): chosen once, when a fuser is built.
VARIANTS: dict[tuple[str, str], type[LayerFuser]] = {
    **{("fedrefine", mode): layer for mode, layer in LAYER_FUSERS.items()},
    ("c2c_reference", "residual"): ReferenceLayerFuser,
}


def _slot(stack: Tensor | None, slot: int) -> Tensor | None:
    return None if stack is None else stack[slot]


class Fuser(nn.Module):
    """All layer fusers for one ordered pair sender -> receiver, with the layer map and gates."""

    def __init__(
        self, sender: ParticipantIdentity, receiver: ParticipantIdentity, config: FuserConfig | None = None
    ) -> None:
        super().__init__()
        self.config = config or FuserConfig()
        self.sender = sender
        self.receiver = receiver
        self.layer_map = layer_map(self.config.layer_map, receiver.num_layers, sender.num_layers)
        layer_class = VARIANTS[self.config.variant, self.config.mode]  # variant and mode are resolved once, here
        self.layers = nn.ModuleList(layer_class(sender, receiver, self.config) for _ in range(receiver.num_layers))
        self.register_buffer("temperature", torch.tensor(self.config.temperature_start), persistent=False)
        self._stacks = InferenceStacks()  # every open layer's weights stacked for inference, rebuilt on change
        self.trained_with: dict[str, str] = {}  # the participants' dtypes and the trainer's precision, saved with it
        #: Where the weights came from when they were not trained here (e.g. an imported C2C checkpoint).
        self.source: dict[str, Any] | None = None

    def _apply(self, fn, recurse: bool = True):
        self._stacks.forget()  # moved or converted: stacked again
        return super()._apply(fn, recurse)

    def anneal(self, progress: float) -> None:
        """Set the gate temperature geometrically between start and end for ``progress`` in [0, 1]."""
        progress = min(max(progress, 0.0), 1.0)
        start, end = self.config.temperature_start, self.config.temperature_end
        self.temperature.fill_(start * (end / start) ** progress)

    def gate_logits(self) -> Tensor:
        return torch.stack([layer.gate_logit().detach() for layer in self.layers])

    def sender_layer_importance(self) -> dict[int, float]:
        """Per sender layer read, the largest gate logit among the receiver layers that read it."""
        importance: dict[int, float] = {}
        for index, logit in enumerate(self.gate_logits().tolist()):
            j = self.layer_map[index]
            importance[j] = max(importance.get(j, float("-inf")), logit)
        return importance

    def sender_layers_needed(self) -> list[int]:
        """Sender layers that open gates read: only these need to be transmitted."""
        return sorted({self.layer_map[i] for i, is_open in enumerate(self.open_layers()) if is_open})

    @property
    def mode(self) -> str:
        return self.config.mode

    def open_layers(self) -> list[bool]:
        """Which layers fuse: all in training (soft gates) and in concat mode (every layer needs an entry at
        the prefix positions; a closed gate zeroes its values), those with ``logit > 0`` in residual eval."""
        if self.training or self.mode == "concat":
            return [True] * len(self.layers)
        return torch.stack([layer.gate_logit() for layer in self.layers]).gt(0).tolist()

    @property
    def fuses_keys(self) -> bool:
        """Whether this fuser writes (residual) or makes (concat) keys, hence reads the sender's keys."""
        return self.layers[0].key is not None

    @property
    def key_frame(self) -> KeyFrame:
        """The frame of the keys this fuser reads and writes: ``position_free`` or ``cache`` (rotated)."""
        return self.layers[0].key_frame

    @property
    def reads_receiver_keys(self) -> bool:
        """Whether the receiver's own (unrotated) keys are an input (residual, keys fused, reading the receiver)."""
        return self.fuses_keys and self.mode == "residual" and self.config.reads_receiver

    def forward(self, sender: KVStack, receiver: KVStack | None = None, scale: Tensor | None = None) -> KVStack | None:
        """Residual deltas (dK, dV) or concat cache entries (K, V) of every receiver layer that fuses, stacked
        over those layers (None: none fuses). All K/V are position-free.

        ``sender`` holds the sender layers that were sent (residual: gathered at the receiver's
        positions), each (B, H_s, N, D_s); ``receiver`` (residual only) the receiver layers to fuse,
        each (B, H_t, N, D_t). A receiver layer fuses when its gate is open and both its sender
        layer and itself are given. Values-only fusers return no keys. ``scale`` (residual only),
        (L_t, B, N) over every receiver layer, multiplies each layer's, sample's and token's deltas
        (0 where a token is not aligned; a gating network's share); applied to the small per-head
        weight ``w``, not to the deltas.
        """
        if (receiver is None) != (self.mode == "concat"):
            raise ValueError(f"A {self.mode} fuser takes {'no' if self.mode == 'concat' else 'the'} receiver states.")
        if scale is not None and receiver is None:
            raise ValueError("scale is for residual fusion; concat fusion weighs its entries' values itself.")
        runs = [i for i, is_open in enumerate(self.open_layers()) if is_open and self.layer_map[i] in sender.layers
                and (receiver is None or i in receiver.layers)]
        if not runs:
            return None
        source = sender.select([self.layer_map[i] for i in runs])  # (R, B, H_s, N, D_s)
        target = None if receiver is None else receiver.select(runs)  # (R, B, H_t, N, D_t)
        scale = None if scale is None else scale[list(runs)]  # (R, B, N)
        if len(runs) > 1 and not self.training and not torch.is_grad_enabled():
            return self._stacked_forward(runs, source, target, scale)
        outputs = []
        for slot, index in enumerate(runs):
            theirs = None if target is None else (_slot(target.keys, slot), target.values[slot])
            outputs.append(self.layers[index](
                (_slot(source.keys, slot), source.values[slot]), theirs, self.temperature, _slot(scale, slot)
            ))
        keys = None if outputs[0][0] is None else torch.stack([k for k, _ in outputs])  # (R, B, H_t, N, D_t)
        return KVStack(tuple(runs), keys, torch.stack([v for _, v in outputs]))

    def inference_stack(self) -> StackedLayers:
        """Every open layer's weights stacked for inference (see :mod:`fedrefine.fuser.stacked`)."""
        return self._stacks.of(self, self.layers, tuple(i for i, is_open in enumerate(self.open_layers()) if is_open))

    def inference_streams(self) -> tuple[StackedLayers, dict[int, StackedStream]]:
        """:meth:`inference_stack`, and open layer -> its [K ;] V streams as one stack (what the last prompt token's
        fusion runs per layer): the parameters' versions checked once for both."""
        stack = self.inference_stack()
        return stack, self._stacks.layer_streams(self.layers)

    def _stacked_forward(self, runs: list[int], sender: KVStack, receiver: KVStack | None, scale: Tensor | None) -> KVStack:
        """Inference over the layers ``runs`` at once (see :mod:`fedrefine.fuser.stacked`); same outputs as the loop."""
        stacked = self.inference_stack().select(runs)  # a chunk of consecutive layers: views
        if receiver is None:  # concat: entries of the sender alone; a closed gate zeroes its values
            gates = torch.stack([self.layers[i].gate_logit() for i in runs]).gt(0).to(sender.values.dtype)  # (R,)
            values = stacked.value(sender.values, None) * gates.view(-1, 1, 1, 1, 1)
            return KVStack(tuple(runs), stacked.key(sender.keys, None), values)
        key_scale, value_scale = self._stream_scales(runs, scale, receiver.values)
        key_input, value_input = stream_inputs(sender.keys, sender.values, self.config.reads_kv_together)
        values = stacked.value(value_input, receiver.values, value_scale)  # residual deltas; open gates are 1 in eval
        keys = None if stacked.key is None else stacked.key(key_input, receiver.keys, key_scale)
        return KVStack(tuple(runs), keys, values)

    def _stream_scales(self, runs: list[int], scale: Tensor | None, like: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """``scale`` (R, B, N) for the K and the V stream, a closed stream gate (layers whose streams are gated
        apart, open because the other stream is) zeroing its stream."""
        gates = [self.layers[i].stream_gates() for i in runs]
        if gates[0] is None or bool(torch.stack(gates).all()):
            return scale, scale
        gates = torch.stack(gates).to(like.dtype)  # (R, 2)
        base = like.new_ones((len(runs), like.shape[1], like.shape[3])) if scale is None else scale  # (R, B, N)
        return base * gates[:, 0, None, None], base * gates[:, 1, None, None]

    # --- persistence -------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """Pair identities, config, layer map, (when known) ``trained_with``: the participants' dtypes and the
        trainer's precision, and ``source`` (where imported weights came from)."""
        source = {} if self.source is None else {"source": self.source}
        trained_with = {"trained_with": dict(self.trained_with)} if self.trained_with else {}
        return {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "sender": self.sender.to_dict(),
            "receiver": self.receiver.to_dict(), "config": asdict(self.config), "layer_map": self.layer_map,
            **source, **trained_with,
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``fuser.safetensors`` (weights) and ``fuser.json`` (pair identity, config, layer map)."""
        directory = Path(directory)
        write_weights(directory / WEIGHTS_FILE, self, FORMAT_NAME)
        (directory / METADATA_FILE).write_text(json.dumps(self.metadata(), indent=2) + "\n")
        return directory

    @staticmethod
    def read_metadata(directory: str | Path) -> dict[str, Any]:
        path = Path(directory) / METADATA_FILE
        if not path.is_file():
            raise FileNotFoundError(f"No fuser at {directory}: {METADATA_FILE} is missing.")
        try:
            metadata = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise FuserFileError(f"{path} is not valid JSON ({err}); the file is truncated or corrupted: re-export the fuser.") from None
        if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME or metadata.get("version") not in READABLE_VERSIONS:
            raise ValueError(
                f"{path} is not a FedRefine fuser of format version {' or '.join(map(str, READABLE_VERSIONS))} "
                f"(got format {metadata.get('format')!r}, version {metadata.get('version')!r})."
            )
        if metadata["version"] == 1 and "positions" in metadata["config"]:
            metadata["config"]["fuse_at"] = metadata["config"].pop("positions")
        return metadata

    @classmethod
    def load(
        cls,
        directory: str | Path,
        sender: ParticipantIdentity,
        receiver: ParticipantIdentity,
        map_location: str | torch.device = "cpu",
    ) -> Fuser:
        """Load a saved fuser for exactly this pair; any other pair is refused."""
        metadata = cls.read_metadata(directory)
        saved_sender = ParticipantIdentity.from_dict(metadata["sender"])
        saved_receiver = ParticipantIdentity.from_dict(metadata["receiver"])
        if (saved_sender, saved_receiver) != (sender, receiver):
            raise FuserPairMismatchError(
                f"The fuser in {directory} was trained for {saved_sender.key} -> {saved_receiver.key}, "
                f"but this pair is {sender.key} -> {receiver.key}{identity_hint((saved_sender, saved_receiver), (sender, receiver))}"
            )
        fuser = cls(sender, receiver, FuserConfig(**metadata["config"]))
        fuser.trained_with = dict(metadata.get("trained_with") or {})
        if fuser.layer_map != metadata["layer_map"]:
            raise ValueError(f"Layer map in {directory} does not match its layer_map kind; the file was edited.")
        fuser.load_state_dict(read_weights(Path(directory) / WEIGHTS_FILE, fuser, map_location))
        fuser.source = metadata.get("source")
        return fuser.to(map_location)



def identity_hint(saved: tuple[ParticipantIdentity, ...], given: tuple[ParticipantIdentity, ...]) -> str:
    """What to do about a pair mismatch: a model known under another name (the same weights, e.g. at another
    path) needs ``name:``; other weights under the same name need their own fuser."""
    hints = []
    for role, old, new in zip(("sender", "receiver"), saved, given):
        if old == new:
            continue
        if old.name_or_path != new.name_or_path and old.revision == new.revision:
            hints.append(f"the {role} is the same model under another name: set `name: {old.name_or_path}` on it")
        elif old.name_or_path == new.name_or_path and old.revision != new.revision:
            hints.append(f"the {role} {new.name_or_path} is another model (its config or weights differ: revision "
                         f"{new.revision}, trained on {old.revision}): train a fuser for it with `fedrefine fit`")
    hint = "; ".join(hints) or "load the fuser trained for this pair, or train one with `fedrefine fit`"
    return f". Same model at another path? set `name:` in its participant config. Here: {hint}."


def fuser_parameter_count(sender: ParticipantIdentity, receiver: ParticipantIdentity, config: FuserConfig) -> int:
    """Trainable parameters of a fuser for this pair, computed without building the LLMs."""
    with torch.device("meta"):
        return sum(p.numel() for p in Fuser(sender, receiver, config).parameters())
