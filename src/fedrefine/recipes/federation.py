"""The federation recipe: one receiver of a federation with any subset of its senders, and its gating network.

    setup          the federation's participants (frozen) and the registry's fusers; the gate (new or saved)
    training_step  a random non-empty subset of senders sends once; the receiver's response loss through the
                   gated fusion trains the gate (and, optionally, the fusers); or, with the ``benefit`` objective,
                   the gate learns which sender alone lowers the loss
    log            loss, subset size, each sender's mean gate weight
    on_train_end   export the gate (and trained fusers back into the registry)

``test`` reports receiver alone, C2C with each single sender and with the whole subset on the same
questions (the shared base).
"""

from __future__ import annotations

from typing import Literal

import torch
from rich.console import Console
from torch import Tensor, nn

from fedrefine.evaluation import EvaluationConfig, Evaluator
from fedrefine.federation import Federation
from fedrefine.federation.selection import MeasuredSelection, PriorSelection
from fedrefine.fuser.registry import FuserRegistry
from fedrefine.fusion import Combine, FusionBatch, SenderStateGate, SourceGate
from fedrefine.participants.sources import ParticipantSource
from fedrefine.recipes.base import FusionModule, mark_frozen, response_loss, response_losses
from fedrefine.tasks.routes import parse_routes


class FederationModule(FusionModule):
    """One receiver, its senders, fusers from the registry, and an optional gating network.

    Args:
        participants: every participant of the federation, by name.
        receiver: the receiving participant's name.
        senders: the names of the senders it may hear from (fusers must exist in the registry).
        registry: directory of the fuser registry, or a registry object (e.g.
            ``fedrefine.runtime.registry_client.RemoteFuserRegistry`` for ``fedrefine serve registry``).
        combine: residual mode with several senders: ``parallel`` or ``sequential``.
        gating: add a gating network (trained by ``fit``).
        gate_reads: what the gating network reads: ``prompt`` (the receiver's prompt; a softmax over its own
            cache and the senders) or ``senders`` (each sender's sent values at the column the receiver's last
            prompt token reads; a weight per sender, so a sender that does not know can be turned off).
        gate_objective: how ``fit`` trains the gating network: ``answer`` (the response's cross-entropy with a random
            sender subset) or ``benefit`` (``gate_reads: senders`` only: each sender's weight learns, as a binary
            target per sample, whether that sender alone lowered the receiver's loss on the response by more than
            ``benefit_margin`` nats).
        benefit_margin: how much a sender must lower the loss to count as helping (``gate_objective: benefit``); a
            sender that does not know still moves the answer, and half of those moves lower the loss a little.
        gating_hidden_size: width of the gating network.
        subset_probability: ``fit`` (``gate_objective: answer``) fuses a random subset of the senders per batch,
            each sender in it with this probability (0.5: every subset alike; 1.0: always all of them, so the gate
            must turn off every sender that does not know).
        gate_path: load a saved gating network from this directory.
        train_fusers: ``fit`` also trains the pairwise fusers (jointly); otherwise they stay frozen.
        export_dir: where ``fit`` writes the gating network (and trained fusers go back to the registry).
        selection: a prior table category -> senders for the ``c2c:auto`` route.
        measure_selection: before ``test``, rank senders per category by single-sender C2C accuracy
            on the validation split and use that for ``c2c:auto`` (overrides ``selection``).
        max_selected: at most this many senders per question from the measured ranking.
        evaluation: answer mode, routes, T2T and rephrasing settings; the default test routes are
            ``receiver``, ``c2c:<s>`` for each sender, and ``c2c`` (all senders), plus ``c2c:auto``
            when a selection is configured.
    """

    def __init__(
        self,
        participants: dict[str, ParticipantSource],
        receiver: str,
        senders: list[str],
        registry: str | FuserRegistry,
        combine: Combine = "parallel",
        gating: bool = False,
        gate_reads: Literal["prompt", "senders"] = "prompt",
        gate_objective: Literal["answer", "benefit"] = "answer",
        benefit_margin: float = 0.0,
        gating_hidden_size: int = 64,
        subset_probability: float = 0.5,
        gate_path: str | None = None,
        train_fusers: bool = False,
        selection: PriorSelection | None = None,
        measure_selection: bool = False,
        max_selected: int | None = None,
        export_dir: str | None = None,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_fraction: float = 0.1,
        max_length: int = 2048,
        evaluation: EvaluationConfig | None = None,
    ) -> None:
        default_routes = ["receiver", *(f"c2c:{s}" for s in senders), "c2c"] if len(senders) > 1 else ["receiver", "c2c"]
        if selection is not None or measure_selection:
            default_routes.append("c2c:auto")
        super().__init__(
            learning_rate, weight_decay, warmup_fraction, max_length, evaluation, export_dir, default_routes,
        )
        self.save_plain_hyperparameters({}, {"selection": selection}, ignore=["participants", "registry"])
        self.hparams["participants"] = {name: source.describe() for name, source in participants.items()}
        # a registry object is recorded by where it is (its endpoint, or its directory)
        self.hparams["registry"] = registry if isinstance(registry, str) else getattr(registry, "endpoint", str(registry.root))
        self.selection = selection
        self.federation = Federation(participants, registry)
        if gate_reads not in ("prompt", "senders"):
            raise ValueError(f"Unknown gate_reads {gate_reads!r}; choose 'prompt' or 'senders'.")
        if not 0.0 < subset_probability <= 1.0:
            raise ValueError(f"subset_probability must be in (0, 1], got {subset_probability}.")
        if gate_objective not in ("answer", "benefit"):
            raise ValueError(f"Unknown gate_objective {gate_objective!r}; choose 'answer' or 'benefit'.")
        if gate_objective == "benefit" and (gate_reads != "senders" or train_fusers):
            raise ValueError(
                "gate_objective: benefit trains a gate that reads the senders (gate_reads: senders) against what each "
                "frozen fuser does alone; set gate_reads: senders and train_fusers: false, or gate_objective: answer."
            )
        receiving = self.federation.participant(receiver)
        self.fused = self.federation.receiver(receiver, senders, combine)
        mark_frozen(receiving, *self.fused.senders.values())
        if gating or gate_path:
            if gate_reads == "senders":
                self.fused.source_gate = SenderStateGate(list(self.fused.fusers), gating_hidden_size)
            else:
                identity = receiving.identity
                self.fused.source_gate = SourceGate(identity.hidden_size, identity.num_layers, len(senders), gating_hidden_size)
        if gate_path:  # saved for exactly these pairs
            self.fused.source_gate.load_weights(gate_path, list(self.fused.fusers))
        self.fused.fusers.requires_grad_(train_fusers)

    def trainable_modules(self) -> list[nn.Module]:
        """The gating network, and the pairwise fusers when ``train_fusers``."""
        gate = [self.fused.source_gate] if self.fused.source_gate is not None else []
        return [self.fused.fusers, *gate] if self.hparams.train_fusers else gate

    def train(self, mode: bool = True) -> FederationModule:
        """Frozen fusers stay in eval mode too (hard gates, no dropout): the gate learns what ``test`` will see."""
        super().train(mode)
        if not self.hparams.train_fusers:
            self.fused.fusers.eval()
        return self

    def on_test_start(self) -> None:
        if self.hparams.measure_selection:
            self.selection = self.measure_selection()
            Console().print(f"[bold]Measured sender selection[/] (category -> senders): {self.selection.ranking}")

    def measure_selection(self) -> MeasuredSelection:
        """Rank senders per category by single-sender C2C accuracy on the validation split."""
        datamodule = self.trainer.datamodule
        questions = datamodule.load_split(datamodule.val_split)
        names = self.fused.sender_names
        routes = parse_routes(["receiver", *(f"c2c:{s}" for s in names)], names)
        report = Evaluator(self.fused, routes, self.evaluation).run(questions, datamodule.eval_batch_size, self.device)
        senders = {name: report.correct(route) for name, route in zip(names, routes[1:])}
        items = [questions[i].item for i in range(len(questions))]
        return MeasuredSelection.from_results(items, report.correct(routes[0]), senders, max_senders=self.hparams.max_selected)

    def title(self) -> str:
        return f"{'+'.join(self.fused.sender_names)} -> {self.hparams.receiver}"

    def random_subset(self) -> list[str]:
        """A random non-empty subset of the senders, each in it with probability ``subset_probability`` (0.5: every
        subset equally likely; 1: all of them), from the step's seed, so resumes redraw it."""
        names = self.fused.sender_names
        while True:
            keep = torch.rand(len(names)) < self.hparams.subset_probability
            if keep.any():
                return [n for n, k in zip(names, keep.tolist()) if k]

    def training_step(self, batch: FusionBatch | None, batch_idx: int) -> Tensor | None:
        if batch is None:
            return None
        if not any(p.requires_grad for p in self.parameters()):
            raise ValueError("Nothing to train: set gating: true and/or train_fusers: true.")
        self.anneal_gates()
        if self.hparams.gate_objective == "benefit":
            loss = self.benefit_loss(batch)
            self.log("train/gate_loss", loss, prog_bar=True, batch_size=len(batch))
            return loss
        subset = self.random_subset()
        sent = self.fused.send(batch, subset, self.training_link)
        output = self.fused(batch, sent.messages, sent.own)
        loss = response_loss(output.logits, batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        self.log("train/subset_size", float(len(subset)), batch_size=len(batch))
        for name, weights in output.gate_weights.items():  # (B, L_t): this step's share of each sender
            self.log(f"gating/{name}", weights.detach().mean(), batch_size=len(batch))
        return loss

    def benefit_loss(self, batch: FusionBatch) -> Tensor:
        """Binary cross-entropy of every sender's gate logits (each receiver layer) against whether that sender,
        fused alone at full weight, lowered the receiver's loss on each sample's response (by over the margin)."""
        fused, names = self.fused, self.fused.sender_names
        with torch.no_grad():
            messages = fused.send(batch, names, self.training_link).messages
            alone = response_losses(fused(batch).logits, batch)  # (B,): the receiver alone
            margin = self.hparams.benefit_margin
            helps = torch.stack(  # each sender alone, fused at full weight (no gate)
                [response_losses(fused(batch, {n: messages[n]}, gated=False).logits, batch) < alone - margin for n in names],
                dim=-1,
            )  # (B, S)
        logits = fused.source_gate.batch_logits(batch, messages, [names.index(n) for n in messages])  # (B, L_t, S)
        for name, share in zip(names, helps.float().mean(0).tolist()):
            self.log(f"gating/{name}_helps", share, batch_size=len(batch))
        target = helps[:, None, :].expand_as(logits).to(logits.dtype)
        return nn.functional.binary_cross_entropy_with_logits(logits, target)

    def on_train_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        directory = self.export_directory()
        if self.fused.source_gate is not None:
            self.fused.source_gate.save(directory, list(self.fused.fusers))
        if self.hparams.train_fusers:
            for fuser in self.fused.fusers:
                self.federation.registry.save(fuser)
        self.report_data_counts(directory)
