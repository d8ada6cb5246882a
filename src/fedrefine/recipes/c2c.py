"""The C2C recipe: one frozen sender -> receiver pair and its trainable fuser.

    setup          load both participants (frozen), and the fuser (saved, or new)
    training_step  the sender prefills the prompt (no grad) and sends its message once; the fuser writes it
                   into the receiver's cache; the receiver's next-token loss on the response trains the fuser only
    log            loss, gate temperature, per-layer gate logits
    on_train_end   export the fuser (safetensors + JSON)

Testing: receiver alone, sender alone, C2C (and controls) on the same questions (the shared base).
"""

from __future__ import annotations

from torch import Tensor

from fedrefine.evaluation import EvaluationConfig
from fedrefine.fuser import Fuser, FuserConfig
from fedrefine.fusion import FusedReceiver, FusionBatch
from fedrefine.participants.sources import ParticipantSource
from fedrefine.recipes.base import FusionModule, load_or_create_fuser, mark_frozen, response_loss
from fedrefine.wire.remote import RemoteSource


class C2CModule(FusionModule):
    """Train and evaluate the fuser of one sender -> receiver pair.

    Args:
        receiver: where the receiver comes from.
        sender: where the sender comes from.
        fuser: fuser size, fusion mode and gate settings.
        fuser_path: start from (or evaluate) a saved fuser directory for exactly this pair.
        export_dir: where to write the trained fuser (safetensors + JSON) at the end of ``fit``;
            default ``<default_root_dir>/fuser``.
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_fraction: share of the optimizer steps spent in linear warm-up (then linear decay to 0).
        max_length: receiver tokens per training sample (prompt + response).
        evaluation: answer mode, routes (see :mod:`fedrefine.tasks.routes`), T2T and rephrasing settings.
        gate_log_every: log the per-layer gate logits every N optimizer steps.
    """

    def __init__(
        self,
        receiver: ParticipantSource,
        sender: ParticipantSource,
        fuser: FuserConfig | None = None,
        fuser_path: str | None = None,
        export_dir: str | None = None,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.01,
        warmup_fraction: float = 0.1,
        max_length: int = 2048,
        evaluation: EvaluationConfig | None = None,
        gate_log_every: int = 50,
    ) -> None:
        super().__init__(
            learning_rate, weight_decay, warmup_fraction, max_length, evaluation, export_dir,
        )
        receiver_participant, sender_participant = receiver.load(), sender.load()
        mark_frozen(receiver_participant, sender_participant)
        fuser_module = load_or_create_fuser(sender_participant, receiver_participant, fuser, fuser_path)
        self.save_plain_hyperparameters({"receiver": receiver, "sender": sender}, {"fuser": fuser_module.config})
        remotes = {sender_participant.name: sender.client()} if isinstance(sender, RemoteSource) else None  # served elsewhere
        self.fused = FusedReceiver(receiver_participant, [sender_participant], [fuser_module], remotes=remotes)
        self.gate_log_every = gate_log_every

    @property
    def fuser(self) -> Fuser:
        return self.fused.fusers[0]

    def training_step(self, batch: FusionBatch | None, batch_idx: int) -> Tensor | None:
        if batch is None:  # every sample of the batch was too long
            return None
        self.anneal_gates()
        sent = self.fused.send(batch, link=self.training_link)  # the sender's message, sent once
        loss = response_loss(self.fused(batch, sent.messages, sent.own).logits, batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        self.log("train/gate_temperature", self.fuser.temperature, batch_size=len(batch))
        if self.gate_log_every and self.global_step % self.gate_log_every == 0:
            self.log_gates("fuser", self.fuser, len(batch))
        return loss

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            directory = self.export_directory()
            self.fuser.trained_with = {**self.fuser.trained_with, "precision": str(self.trainer.precision)}
            self.fuser.save(directory)
            self.report_data_counts(directory)
