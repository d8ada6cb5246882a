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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fedrefine.cache import LayerKV, LayerMapKind, layer_map
from fedrefine.field_help import documented
from fedrefine.fuser_stack import StackedLayers
from fedrefine.kv_stack import KVStack
from fedrefine.participants import ParticipantIdentity

FORMAT_NAME = "fedrefine.fuser"
FORMAT_VERSION = 2
#: Version 1 named ``fuse_at`` ``positions``; it is read with that one key renamed.
READABLE_VERSIONS = (1, 2)
WEIGHTS_FILE = "fuser.safetensors"
METADATA_FILE = "fuser.json"


#: Which receiver tokens a residual fuser writes to (see :class:`FuserConfig`'s ``fuse_at``).
FuseAt = Literal["prompt", "all", "last"]
FusionMode = Literal["residual", "concat"]


class FuserFileError(ValueError):
    """A saved fuser's files are missing, unreadable, or do not belong together."""


class FuserPairMismatchError(ValueError):
    """A fuser was trained for another sender/receiver pair than the one it is loaded into."""


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@documented
@dataclass
class FuserConfig:
    """Size and behaviour of a fuser. ``hidden_size=1024, num_blocks=3`` is the C2C reference size."""

    mode: FusionMode = field(
        default="residual",
        metadata=_help("residual: add to the receiver's cache at aligned positions (sender and receiver read the "
                       "same text). concat: project the sender's cache into extra receiver cache entries placed "
                       "ahead of the receiver's own (texts may differ)."),
    )
    hidden_size: int = field(default=256, metadata=_help("Width of each stream's MLP trunk."))
    num_blocks: int = field(default=3, metadata=_help("Residual MLP blocks per stream (>= 2: trunk + weight head)."))
    ffn_multiplier: float = field(default=1.0, metadata=_help("Inner width of each block, as a multiple of hidden_size."))
    dropout: float = field(default=0.1, metadata=_help("Dropout inside the blocks (training only)."))
    layer_map: LayerMapKind = field(
        default="bottom_up", metadata=_help("Which sender layer feeds each receiver layer: bottom_up, top_down, uniform.")
    )
    gate_init: float = field(default=1.0, metadata=_help("Initial logit of every layer's gate (> 0: open)."))
    fuse_keys: bool = field(
        default=True,
        metadata=_help("Residual mode: False leaves the receiver's keys, hence where it attends, untouched and "
                       "fuses values only."),
    )
    reads_receiver: bool = field(
        default=True,
        metadata=_help("Residual mode: False computes the deltas from the sender's states alone, so the fuser "
                       "cannot key on receiver features of tokens the receiver never learned."),
    )
    fuse_at: FuseAt = field(
        default="prompt",
        metadata=_help("Residual mode: which receiver tokens are fused. prompt (the C2C reference): every aligned "
                       "prompt token but the last. all: the last prompt token too, fused as the receiver computes "
                       "it. last: only the last prompt token; with an answer prefix every participant reads, that "
                       "is where the sender has worked out its answer."),
    )
    temperature_start: float = field(default=1.0, metadata=_help("Gate temperature at the start of training."))
    temperature_end: float = field(default=0.001, metadata=_help("Gate temperature at the end (geometric schedule)."))

    def __post_init__(self) -> None:
        if self.num_blocks < 2:
            raise ValueError(f"num_blocks must be at least 2 (trunk + weight head), got {self.num_blocks}.")
        if self.mode not in get_args(FusionMode):
            raise ValueError(f"Unknown fusion mode {self.mode!r}; choose 'residual' or 'concat'.")
        if self.hidden_size < 1:
            raise ValueError(f"hidden_size must be positive, got {self.hidden_size}.")
        if self.fuse_at not in get_args(FuseAt):
            raise ValueError(f"Unknown fuse_at {self.fuse_at!r}; choose 'prompt', 'all' or 'last'.")
        if self.fuse_at != "prompt" and self.mode != "residual":
            raise ValueError(
                f"fuse_at={self.fuse_at!r} is for residual fusion; concat entries are read by every receiver token."
            )


class FeedForwardBlock(nn.Module):
    """Pre-norm residual MLP: x + Dropout(W2 GELU(W1 RMSNorm(x)))."""

    def __init__(self, dim: int, inner_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.up = nn.Linear(dim, inner_dim)
        self.down = nn.Linear(inner_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dropout(self.down(nn.functional.gelu(self.up(self.norm(x)))))


class StreamFuser(nn.Module):
    """One stream (K or V) of one layer: trunk, projection head and per-head weight head."""

    def __init__(self, sender_dim: int, receiver_heads: int, receiver_head_dim: int, config: FuserConfig) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, max(1, round(config.hidden_size * config.ffn_multiplier))
        receiver_dim = receiver_heads * receiver_head_dim
        reads_receiver = config.mode == "residual" and config.reads_receiver
        self.receiver_heads, self.receiver_head_dim = receiver_heads, receiver_head_dim
        self.sender_norm = nn.RMSNorm(sender_dim)
        self.receiver_norm = nn.RMSNorm(receiver_dim) if reads_receiver else None
        self.input = nn.Linear(sender_dim + (receiver_dim if reads_receiver else 0), hidden)
        self.trunk = FeedForwardBlock(hidden, inner, config.dropout)
        self.projection_blocks = nn.Sequential(
            *(FeedForwardBlock(hidden, inner, config.dropout) for _ in range(config.num_blocks - 2))
        )
        self.projection = nn.Linear(hidden, receiver_dim)
        self.weight_block = FeedForwardBlock(hidden, inner, config.dropout)
        self.weight_head = nn.Linear(hidden, receiver_heads)
        # Start as the identity map on the receiver's cache: nothing is added until trained.
        nn.init.zeros_(self.projection.weight)
        nn.init.zeros_(self.projection.bias)

    def forward(self, sender: Tensor, receiver: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
        """Weighted projection ``w * p`` (B, H_t, N, D_t) from sender (B, H_s, N, D_s) [and receiver] states;
        ``scale`` (B, N) multiplies each token's weight ``w`` (e.g. 0 where a token is not aligned)."""
        batch, _, length, _ = sender.shape
        features = self.sender_norm(sender.transpose(1, 2).flatten(2))
        if self.receiver_norm is not None:  # residual mode reading the receiver's states
            if receiver is None:
                raise ValueError("A residual fuser needs the receiver's states at the same positions.")
            features = torch.cat((features, self.receiver_norm(receiver.transpose(1, 2).flatten(2))), dim=-1)
        h = self.trunk(self.input(features))
        p = self.projection(self.projection_blocks(h)).view(batch, length, self.receiver_heads, self.receiver_head_dim)
        w = torch.sigmoid(self.weight_head(self.weight_block(h))).unsqueeze(-1)  # (B, N, H_t, 1)
        if scale is not None:
            w = w * scale[:, :, None, None]
        return (w * p).transpose(1, 2)


class ConcreteGate(nn.Module):
    """Per-layer gate: binary-concrete sample with logistic noise in training, ``logit > 0`` in eval."""

    def __init__(self, init: float) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.tensor(float(init)))

    def forward(self, temperature: Tensor) -> Tensor:
        if not self.training:
            return (self.logit > 0).to(self.logit.dtype)
        u = torch.rand((), device=self.logit.device).clamp(1e-6, 1 - 1e-6)
        noise = torch.log(u) - torch.log1p(-u)  # logistic, so P(open) = sigmoid(logit)
        return torch.sigmoid((self.logit + noise) / temperature)


class LayerFuser(nn.Module):
    """Fuser for one receiver layer: K and V streams plus the layer's gate (see the two modes below)."""

    def __init__(self, sender: ParticipantIdentity, receiver: ParticipantIdentity, config: FuserConfig) -> None:
        super().__init__()
        sender_dim = sender.num_kv_heads * sender.head_dim
        fuse_keys = config.fuse_keys or config.mode == "concat"  # concat entries need keys of their own
        self.key = StreamFuser(sender_dim, receiver.num_kv_heads, receiver.head_dim, config) if fuse_keys else None
        self.value = StreamFuser(sender_dim, receiver.num_kv_heads, receiver.head_dim, config)
        self.gate = ConcreteGate(config.gate_init)


class ResidualLayerFuser(LayerFuser):
    """Residual mode: gated deltas (dK, dV) for the receiver's (unrotated) K/V at the same positions;
    dK is None when the fuser fuses values only (``fuse_keys: false``)."""

    def forward(self, sender: KVPair, receiver: KVPair, temperature: Tensor, scale: Tensor | None = None) -> KVPair:
        g = self.gate(temperature)
        delta_values = g * self.value(sender[1], receiver[1], scale)  # (B, H_t, N, D_t)
        if self.key is None:
            return None, delta_values
        return g * self.key(sender[0], receiver[0], scale), delta_values


class ConcatLayerFuser(LayerFuser):
    """Concat mode: new (K, V) cache entries from the sender's states alone; the gate scales the values."""

    def forward(self, sender: KVPair, receiver: None, temperature: Tensor, scale: None = None) -> LayerKV:
        g = self.gate(temperature)
        return self.key(sender[0]), g * self.value(sender[1])  # (B, H_t, N_s, D_t) each


#: One layer's (K, V) where the keys may be absent (values-only fusion).
KVPair = tuple[Tensor | None, Tensor]


def _slot(stack: Tensor | None, slot: int) -> Tensor | None:
    return None if stack is None else stack[slot]


LAYER_FUSERS: dict[str, type[LayerFuser]] = {"residual": ResidualLayerFuser, "concat": ConcatLayerFuser}


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
        layer_class = LAYER_FUSERS[self.config.mode]  # the mode is resolved once, here
        self.layers = nn.ModuleList(layer_class(sender, receiver, self.config) for _ in range(receiver.num_layers))
        self.register_buffer("temperature", torch.tensor(self.config.temperature_start), persistent=False)
        self._stack: StackedLayers | None = None  # every open layer's weights stacked for inference, rebuilt on change

    def anneal(self, progress: float) -> None:
        """Set the gate temperature geometrically between start and end for ``progress`` in [0, 1]."""
        progress = min(max(progress, 0.0), 1.0)
        start, end = self.config.temperature_start, self.config.temperature_end
        self.temperature.fill_(start * (end / start) ** progress)

    def gate_logits(self) -> Tensor:
        return torch.stack([layer.gate.logit.detach() for layer in self.layers])

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
        return torch.stack([layer.gate.logit for layer in self.layers]).gt(0).tolist()

    @property
    def fuses_keys(self) -> bool:
        """Whether this fuser writes (residual) or makes (concat) keys, hence reads the sender's keys."""
        return self.layers[0].key is not None

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

    def _stacked_forward(self, runs: list[int], sender: KVStack, receiver: KVStack | None, scale: Tensor | None) -> KVStack:
        """Inference over the layers ``runs`` at once (see :mod:`fedrefine.fuser_stack`); same outputs as the loop."""
        versions = tuple((p.data_ptr(), p._version) for p in self.parameters())  # moved or updated: re-stack
        opened = tuple(i for i, is_open in enumerate(self.open_layers()) if is_open)
        if self._stack is None or self._stack.indices != opened or self._stack.versions != versions:
            self._stack = StackedLayers.of(self.layers, opened, versions)  # every open layer, stacked once
        stacked = self._stack.select(runs)  # a chunk of consecutive layers: views
        if receiver is None:  # concat: entries of the sender alone; a closed gate zeroes its values
            gates = torch.stack([self.layers[i].gate.logit for i in runs]).gt(0).to(sender.values.dtype)  # (R,)
            values = stacked.value(sender.values, None) * gates.view(-1, 1, 1, 1, 1)
            return KVStack(tuple(runs), stacked.key(sender.keys, None), values)
        values = stacked.value(sender.values, receiver.values, scale)  # residual deltas; open gates are 1 in eval
        keys = None if stacked.key is None else stacked.key(sender.keys, receiver.keys, scale)
        return KVStack(tuple(runs), keys, values)

    # --- persistence -------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "sender": self.sender.to_dict(),
            "receiver": self.receiver.to_dict(),
            "config": asdict(self.config),
            "layer_map": self.layer_map,
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
                f"but this pair is {sender.key} -> {receiver.key}. Load the fuser trained for this pair, "
                f"or train one with `fedrefine fit`."
            )
        fuser = cls(sender, receiver, FuserConfig(**metadata["config"]))
        if fuser.layer_map != metadata["layer_map"]:
            raise ValueError(f"Layer map in {directory} does not match its layer_map kind; the file was edited.")
        fuser.load_state_dict(read_weights(Path(directory) / WEIGHTS_FILE, fuser, map_location))
        return fuser.to(map_location)


def write_weights(path: Path, module: nn.Module, format_name: str) -> None:
    """A module's state (a fuser's, a gate's) as a safetensors file tagged with its format (directories made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in module.state_dict().items()}
    save_file(tensors, path, metadata={"format": format_name})


def read_weights(path: Path, module: nn.Module, map_location: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The tensors of a saved module's safetensors file (a fuser's, a gate's), checked against ``module``, built
    from the metadata saved beside it: every error names the file."""
    if not path.is_file():
        raise FuserFileError(f"{path} is missing; a saved fuser or gate needs its JSON metadata and {path.name}.")
    try:
        weights = load_file(path, device=str(map_location))
    except (SafetensorError, OSError, ValueError) as err:
        raise FuserFileError(
            f"{path} is not a readable safetensors file ({err}); it is truncated or corrupted: re-export or copy the fuser again."
        ) from None
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in weights.items()}
    problems = [f"missing {name}" for name in expected if name not in found]
    problems += [f"unexpected {name}" for name in found if name not in expected]
    problems += [f"{name} is {found[name]}, expected {shape}" for name, shape in expected.items() if found.get(name, shape) != shape]
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise FuserFileError(
            f"{path} does not hold the weights that the metadata beside it describes ({shown}); the two files come "
            f"from different exports: copy both from the same one."
        )
    return weights


def fuser_parameter_count(sender: ParticipantIdentity, receiver: ParticipantIdentity, config: FuserConfig) -> int:
    """Trainable parameters of a fuser for this pair, computed without building the LLMs."""
    with torch.device("meta"):
        return sum(p.numel() for p in Fuser(sender, receiver, config).parameters())
