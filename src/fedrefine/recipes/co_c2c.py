"""The Co-C2C recipe: one training run trains F[second -> first] and F[first -> second].

    setup          load both participants (frozen); a fused receiver per direction, fusers new or from a registry
    training_step  on every batch each model is once the receiver and once the sender (the FedRefine paper's
                   eq. 2-3): each direction sends, fuses and takes its response loss; the two are summed
    log            the total and each direction's loss
    on_train_end   both fusers into the registry

``test`` evaluates the direction whose receiver ``eval_receiver`` names (the shared base).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from fedrefine.data.conversations import ChatExample
from fedrefine.evaluation import EvaluationConfig
from fedrefine.fuser import Fuser, FuserConfig
from fedrefine.fuser.registry import FuserRegistry
from fedrefine.fusion import FusedReceiver, FusionBatch
from fedrefine.participants import Participant
from fedrefine.participants.sources import ParticipantSource
from fedrefine.recipes.base import FusionModule, mark_frozen, response_loss

Role = Literal["first", "second"]


class CoC2CModule(FusionModule):
    """Both directions of a pair, trained together.

    Args:
        first: one participant.
        second: the other participant.
        fuser: config of both fusers.
        eval_receiver: which participant receives in ``validate``/``test``.
        registry: at the end of ``fit`` both fusers are saved into this registry
            (default: ``<export_dir or log_dir>/registry``).
        from_registry: start from (or evaluate) both fusers saved in ``registry``.
    """

    def __init__(
        self,
        first: ParticipantSource,
        second: ParticipantSource,
        fuser: FuserConfig | None = None,
        eval_receiver: Role = "first",
        registry: str | None = None,
        from_registry: bool = False,
        export_dir: str | None = None,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.01,
        warmup_fraction: float = 0.1,
        max_length: int = 2048,
        evaluation: EvaluationConfig | None = None,
    ) -> None:
        super().__init__(
            learning_rate, weight_decay, warmup_fraction, max_length, evaluation, export_dir,
        )
        fuser = fuser or FuserConfig()
        self.save_plain_hyperparameters({"first": first, "second": second}, {"fuser": fuser})
        a, b = first.load(), second.load()
        mark_frozen(a, b)
        if from_registry and registry is None:
            raise ValueError("from_registry needs the registry's directory: set model.registry.")
        saved = FuserRegistry(registry) if from_registry else None

        def fuser_for(sender: Participant, receiver: Participant) -> Fuser:
            return saved.get(sender.identity, receiver.identity) if saved else Fuser(sender.identity, receiver.identity, fuser)

        self.directions = nn.ModuleDict(
            {"first": FusedReceiver(a, [b], [fuser_for(b, a)]), "second": FusedReceiver(b, [a], [fuser_for(a, b)])}
        )
        self.eval_receiver = eval_receiver
        self.registry = registry

    @property
    def fused(self) -> FusedReceiver:
        return self.directions[self.eval_receiver]

    def trainable_modules(self) -> list[nn.Module]:
        """Both directions' fusers."""
        return [model.fusers for model in self.directions.values()]

    def encode_chat_batch(self, examples: Sequence[ChatExample]) -> dict[str, FusionBatch | None]:
        return {role: self.chat_batches.batch(model, examples) for role, model in self.directions.items()}

    def training_step(self, batch: dict[str, FusionBatch | None], batch_idx: int) -> Tensor | None:
        self.anneal_gates()
        losses = {}
        for role, model in self.directions.items():
            if batch[role] is not None:
                sent = model.send(batch[role], link=self.training_link)
                losses[role] = response_loss(model(batch[role], sent.messages, sent.own).logits, batch[role])
                self.log(f"train/loss_{role}_receives", losses[role], batch_size=len(batch[role]))
        if not losses:
            return None
        total = sum(losses.values())
        self.log("train/loss", total, prog_bar=True, batch_size=max(len(b) for b in batch.values() if b is not None))
        return total

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            registry = FuserRegistry(self.registry or self.export_directory().parent / "registry")
            for model in self.directions.values():
                registry.save(model.fusers[0])
            self.report_data_counts(registry.root)
