"""How ``validate`` / ``test`` / ``fedrefine bench`` answer questions and what they report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fedrefine.field_help import documented
from fedrefine.multiple_choice import AnswerStyle
from fedrefine.privacy.rephrase import RephraseConfig
from fedrefine.routes import OptionsPolicy
from fedrefine.t2t import T2TConfig

#: ``logits``: argmax of the next-token logits over the option letters; ``cloze``: argmax of each
#: option text's mean log-probability after "The correct answer is" (lm-eval-harness style);
#: ``generate``: greedy generation and answer extraction.
AnswerMode = Literal["logits", "cloze", "generate"]


def answer_style(mode: AnswerMode) -> AnswerStyle:
    """How the prompt asks to answer: by the option's text for cloze scoring, else by letter."""
    return "text" if mode == "cloze" else "letter"


@documented
@dataclass
class EvaluationConfig:
    """How ``validate`` / ``test`` answer and what they report ."""

    answer_mode: AnswerMode = field(
        default="logits",
        metadata={"help": "logits (argmax over option letters, deterministic), cloze (option texts' likelihood, "
                          "deterministic) or generate (greedy + extractor)."},
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Generation budget in generate mode and for predict."})
    test_routes: list[str] | None = field(
        default=None, metadata={"help": "Routes test reports (see fedrefine.routes; None: the module's default)."}
    )
    val_routes: list[str] = field(
        default_factory=lambda: ["c2c"], metadata={"help": "Routes evaluated during fit validation and validate."}
    )
    t2t: T2TConfig = field(
        default_factory=T2TConfig, metadata={"help": "The T2T baseline's prompt, token budget and byte accounting."}
    )
    rephrase: RephraseConfig = field(
        default_factory=RephraseConfig,
        metadata={"help": "How the receiver rephrases queries for @shared / @private routes."},
    )
    rephrase_cache_dir: str | None = field(
        default=None, metadata={"help": "Disk cache of rephrasings (None: not cached across runs)."}
    )
    options: OptionsPolicy = field(
        default="verbatim",
        metadata={"help": "What C2C senders get of a question's options in rephrased modes: verbatim (residual "
                          "fusion needs it), rephrase or withhold."},
    )
    prefill_answer: bool = field(
        default=False,
        metadata={"help": "C2C senders read the answer prefix ('The correct answer is') too, as an assistant "
                          "prefill, so their cache holds what they would answer (logits/cloze only; train the "
                          "fuser the same way with the data module's response_prefill). The receiver's prompt is "
                          "the same either way."},
    )

    def __post_init__(self) -> None:
        if self.prefill_answer and self.answer_mode == "generate":
            raise ValueError("evaluation.prefill_answer needs answer_mode 'logits' or 'cloze' (a scored answer prefix).")
