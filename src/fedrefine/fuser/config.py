"""A fuser's settings (:class:`FuserConfig`) and its layer map: which sender layer feeds each receiver layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from fedrefine.settings import documented

#: Which receiver tokens a residual fuser writes to (see :class:`FuserConfig`'s ``fuse_at``).
FuseAt = Literal["prompt", "all", "last"]
FusionMode = Literal["residual", "concat"]
LayerMapKind = Literal["bottom_up", "top_down", "uniform"]
#: Which function a layer fuser computes (see :class:`FuserConfig`'s ``variant``).
FuserVariant = Literal["fedrefine", "c2c_reference"]
#: How a residual sender's tokens are matched to the receiver's: ``spans`` (each model reads its own tokens; a
#: receiver token reads the sender token covering its last character) or the C2C reference's re-encoding
#: (``reference``: a receiver token's first piece in the sender's tokenizer; ``reference_longest``: its longest).
TokenAlignment = Literal["spans", "reference", "reference_longest"]
#: The noise a gate draws in training: ``logistic`` (binary concrete, P(open) = sigmoid(logit)) or ``gumbel``
#: (what the C2C reference draws: one Gumbel sample, per element of the deltas).
GateNoise = Literal["logistic", "gumbel"]


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
    reads_kv_together: bool = field(
        default=False,
        metadata=_help("Residual mode: True has each stream (K and V) read the sender's keys and values side by "
                       "side, instead of the K stream the sender's keys and the V stream its values (a sender's "
                       "top-layer keys and values together can hold more of an answer than either alone). The input "
                       "Linear of each stream is twice as wide on the sender's side; the message is unchanged."),
    )
    fuse_at: FuseAt = field(
        default="prompt",
        metadata=_help("Residual mode: which receiver tokens are fused. prompt (the C2C reference): every aligned "
                       "prompt token but the last. all: the last prompt token too, fused as the receiver computes "
                       "it. last: only the last prompt token; with an answer prefix every participant reads, that "
                       "is where the sender has worked out its answer."),
    )
    variant: FuserVariant = field(
        default="fedrefine",
        metadata=_help("fedrefine: this project's layer fuser (normalised inputs, keys fused without rotary "
                       "embedding, one gate per layer). c2c_reference: the function of the C2C reference's "
                       "C2CProjector (raw concatenated inputs, bias-free blocks, a key gate and a value gate, keys "
                       "fused as the cache holds them, rotated); residual mode only, what `fedrefine import-c2c` "
                       "writes."),
    )
    gate_noise: GateNoise = field(
        default="logistic",
        metadata=_help("Training-time gate noise: logistic (binary concrete, open with probability "
                       "sigmoid(logit), as at inference) or gumbel (the C2C reference's draw: open with "
                       "probability 0.63 at logit 0 while inference opens only above 0)."),
    )
    token_alignment: TokenAlignment = field(
        default="spans",
        metadata=_help("Residual mode: spans (each model reads the text in its own tokens and template; receiver "
                       "tokens read the sender token covering their last character; template tokens are not fused) "
                       "or the C2C reference's: reference / reference_longest (same vocabulary: the sender reads "
                       "the receiver's own ids, template included, all fused; another tokenizer: each receiver "
                       "content token re-encoded into the sender's first / longest piece)."),
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
        if self.variant not in get_args(FuserVariant):
            raise ValueError(f"Unknown fuser variant {self.variant!r}; choose 'fedrefine' or 'c2c_reference'.")
        if self.gate_noise not in get_args(GateNoise):
            raise ValueError(f"Unknown gate_noise {self.gate_noise!r}; choose 'logistic' or 'gumbel'.")
        if self.token_alignment not in get_args(TokenAlignment):
            raise ValueError(f"Unknown token_alignment {self.token_alignment!r}; choose one of {list(get_args(TokenAlignment))}.")
        if self.token_alignment != "spans" and (self.mode, self.fuse_at) != ("residual", "prompt"):
            raise ValueError(
                f"token_alignment {self.token_alignment!r} is the C2C reference's, for residual fusion of the prompt; "
                f"got mode {self.mode!r}, fuse_at {self.fuse_at!r}: set token_alignment 'spans' or fuse_at 'prompt'."
            )
        if self.reads_kv_together and (self.mode != "residual" or not self.fuse_keys):
            raise ValueError(
                f"reads_kv_together reads the sender's keys beside its values in residual fusion; got mode {self.mode!r}, "
                f"fuse_keys {self.fuse_keys}: set mode 'residual' and fuse_keys true, or reads_kv_together false."
            )
        if self.variant == "c2c_reference":
            self._check_reference()
        if self.fuse_at != "prompt" and self.mode != "residual":
            raise ValueError(
                f"fuse_at={self.fuse_at!r} is for residual fusion; concat entries are read by every receiver token."
            )

    def _check_reference(self) -> None:
        """The reference's projector adds to the receiver's cache from both caches, keys and values alike."""
        conflicts = {"mode": (self.mode, "residual"), "fuse_keys": (self.fuse_keys, True),
                     "reads_receiver": (self.reads_receiver, True), "reads_kv_together": (self.reads_kv_together, False)}
        wrong = [f"{name}={got!r} (needs {needed!r})" for name, (got, needed) in conflicts.items() if got != needed]
        if self.num_blocks < 3:
            wrong.append(f"num_blocks={self.num_blocks} (needs >= 3)")
        if wrong:
            raise ValueError(
                f"variant 'c2c_reference' computes the C2C reference's residual projector: {', '.join(wrong)}; "
                f"change these settings or use variant 'fedrefine'."
            )


def layer_map(kind: LayerMapKind, receiver_layers: int, sender_layers: int) -> list[int]:
    """For each receiver layer, the sender layer whose cache feeds its fuser.

    - ``bottom_up`` (FedRefine): receiver layer l <- sender layer l, clamped to the sender's top.
    - ``top_down`` (C2C reference): the top layers align; receiver l <- sender S - T + l, clamped at 0.
    - ``uniform``: depth-proportional; first to first and last to last.
    """
    if receiver_layers < 1 or sender_layers < 1:
        raise ValueError(f"Depths must be positive, got receiver={receiver_layers}, sender={sender_layers}.")
    T, S = receiver_layers, sender_layers
    if kind == "bottom_up":
        return [min(t, S - 1) for t in range(T)]
    if kind == "top_down":
        return [max(S - T + t, 0) for t in range(T)]
    if kind == "uniform":
        if T == 1:
            return [S - 1]
        return [round(t * (S - 1) / (T - 1)) for t in range(T)]
    raise ValueError(f"Unknown layer map {kind!r}; choose 'bottom_up', 'top_down' or 'uniform'.")
