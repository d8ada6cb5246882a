"""A route's results on a batch, and their tally over an evaluation: accuracy with its interval,
latency per stage, bytes sent, leakage."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

#: Latency stages, in pipeline order. ``transfer`` is measured with remote senders (the calls' wall time
#: less the senders' own work) and otherwise modelled from the bytes sent (benchmarks); ``fuse`` is the
#: time inside fusers and the gating network, taken out of the receiver's.
STAGES: tuple[str, ...] = ("rephrase", "sender", "transfer", "fuse", "receiver")


@dataclass
class RouteResult:
    """One route on one batch.

    ``predictions``: option index per question (-1 = wrong/unanswerable); ``seconds``: wall time;
    ``stages``: seconds per stage (see :data:`STAGES`); ``bytes_sent``: exact bytes the senders
    transmitted (C2C: K/V of the carried layers at the transmitted positions; T2T: token ids);
    ``bytes_per_token``: bytes per transmitted token position, summed over senders
    (``sender_bytes_per_token``: the same per sender); ``selected``: for ``c2c:auto``, the senders
    chosen per encoded question; ``leakage``: for rephrased modes, the mean share of the question's
    content words that reached senders, and ``private_tokens`` (leaked, all) the word tokens of the questions'
    ``private_text`` found in what senders received; ``unfaithful`` (questions, all): for rephrased modes, the
    questions with a rephrasing that failed the rephraser's faithfulness check; ``cloze_predictions`` (cloze mode): the option index per
    question under each normalisation (``sum``, ``chars``, ``token_mean``), -1 where unanswered.
    With remote senders: ``transport_bytes`` is what the transport carried (payload and framing),
    ``contributed`` the senders whose message was fused, ``dropped`` sender -> why it was left out
    (``reason: detail``) for the batch's questions. ``failures``: batch row -> why this route could not answer
    that question (counted wrong); ``option_scores``: per batch row, every option's score under each
    normalisation (empty where none was scored).
    """

    predictions: Tensor
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_per_token: float = 0.0
    sender_bytes_per_token: dict[str, float] = field(default_factory=dict)
    selected: list[tuple[str, ...]] | None = None
    leakage: float | None = None
    private_tokens: tuple[int, int] | None = None
    unfaithful: tuple[int, int] | None = None
    cloze_predictions: dict[str, Tensor] = field(default_factory=dict)
    transport_bytes: int = 0
    contributed: tuple[str, ...] = ()
    dropped: dict[str, str] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    option_scores: list[dict[str, list[float]]] = field(default_factory=list)


#: lm-eval-harness's names of the accuracies under the ``sum`` and ``chars`` normalisations.
LM_EVAL_ACCURACIES: dict[str, str] = {"acc": "sum", "acc_norm": "chars"}


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy (well-behaved at 0% and 100% and for small counts)."""
    if total == 0:
        return 0.0, 0.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * ((p * (1 - p) / total + z * z / (4 * total * total)) ** 0.5) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class RouteTally:
    """A route's results accumulated over batches (every question counts, failures as wrong)."""

    correct: int = 0
    questions: int = 0
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_per_token: float = 0.0
    sender_bytes_per_token: dict[str, float] = field(default_factory=dict)
    leakage_sum: float = 0.0
    leakage_batches: int = 0
    private_tokens_leaked: int = 0
    private_tokens: int = 0
    unfaithful: int = 0
    rephrased: int = 0
    cloze_correct: dict[str, int] = field(default_factory=dict)
    transport_bytes: int = 0
    contributed: dict[str, int] = field(default_factory=dict)  # sender -> questions its message was fused into
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)  # sender -> reason -> questions left out of

    def add(self, result: RouteResult, labels: Tensor) -> None:
        self.correct += int((result.predictions == labels).sum())
        for normalization, predictions in result.cloze_predictions.items():
            self.cloze_correct[normalization] = self.cloze_correct.get(normalization, 0) + int((predictions == labels).sum())
        self.questions += len(labels)
        self.seconds += result.seconds
        for stage, seconds in result.stages.items():
            self.stages[stage] = self.stages.get(stage, 0.0) + seconds
        self.bytes_sent += result.bytes_sent
        self.bytes_per_token = max(self.bytes_per_token, result.bytes_per_token)
        for sender, value in result.sender_bytes_per_token.items():
            self.sender_bytes_per_token[sender] = max(self.sender_bytes_per_token.get(sender, 0.0), value)
        if result.leakage is not None:
            self.leakage_sum += result.leakage
            self.leakage_batches += 1
        if result.private_tokens is not None:
            self.private_tokens_leaked += result.private_tokens[0]
            self.private_tokens += result.private_tokens[1]
        if result.unfaithful is not None:
            self.unfaithful += result.unfaithful[0]
            self.rephrased += result.unfaithful[1]
        self.transport_bytes += result.transport_bytes
        for sender in result.contributed:
            self.contributed[sender] = self.contributed.get(sender, 0) + len(labels)
        for sender, why in result.dropped.items():
            reasons = self.dropped.setdefault(sender, {})
            reason = why.split(":", 1)[0]
            reasons[reason] = reasons.get(reason, 0) + len(labels)

    def row(self) -> dict[str, float | int | None]:
        """Accuracy with its 95% interval, in cloze mode lm-eval's ``acc`` (sum) and ``acc_norm`` (chars) too,
        latency per question (total and per stage), bytes, leakage."""
        n = max(1, self.questions)
        low, high = wilson_interval(self.correct, self.questions)
        cloze = {name: self.cloze_correct[by] / n for name, by in LM_EVAL_ACCURACIES.items() if by in self.cloze_correct}
        return {
            "accuracy": self.correct / n,
            "ci_low": low,
            "ci_high": high,
            **cloze,
            "questions": self.questions,
            "latency_ms": 1000 * self.seconds / n,
            **{f"{stage}_ms": 1000 * seconds / n for stage, seconds in sorted(self.stages.items())},
            "bytes_per_token": self.bytes_per_token,
            "bytes_per_question": self.bytes_sent / n,
            "sender_bytes_per_token": dict(self.sender_bytes_per_token),
            "leakage_overlap": self.leakage_sum / self.leakage_batches if self.leakage_batches else None,
            "leakage_private_tokens": self.private_tokens_leaked / self.private_tokens if self.private_tokens else None,
            "rephrasings_unfaithful": self.unfaithful / self.rephrased if self.rephrased else None,
            "transport_bytes_per_question": self.transport_bytes / n,
            "senders_contributed": dict(self.contributed),
            "senders_dropped": {sender: dict(reasons) for sender, reasons in self.dropped.items()},
        }
