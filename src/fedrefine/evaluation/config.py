"""How ``validate`` / ``test`` / ``fedrefine bench`` answer questions and what they report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fedrefine.privacy.rephrase import RephraseConfig
from fedrefine.settings import documented
from fedrefine.tasks.multiple_choice import PROMPT_STYLES, AnswerStyle, PromptStyle
from fedrefine.tasks.routes import OptionsPolicy
from fedrefine.tasks.scoring import Normalization, check_normalization
from fedrefine.tasks.t2t import T2TConfig
from fedrefine.wire import LinkConfig

#: ``logits``: argmax of the next-token logits over the option letters; ``cloze``: argmax of each
#: option text's log-likelihood after the prompt, normalised per ``cloze_normalization`` (lm-eval-harness
#: style); ``generate``: greedy generation and answer extraction.
AnswerMode = Literal["logits", "cloze", "generate"]


def answer_style(mode: AnswerMode) -> AnswerStyle:
    """How the prompt asks to answer: by the option's text for cloze scoring, else by letter."""
    return "text" if mode == "cloze" else "letter"


def check_prompt_style(prompt_style: PromptStyle, mode: AnswerMode, prefill: bool) -> None:
    """``lm_eval`` prompts (the bare stem) are scored by cloze and have no answer prefix to prefill."""
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"Unknown evaluation.prompt_style {prompt_style!r}; choose one of {list(PROMPT_STYLES)}.")
    if prompt_style == "c2c_reference" and (mode == "cloze" or prefill):
        raise ValueError(
            f"evaluation.prompt_style 'c2c_reference' (the C2C reference's multiple-choice protocol) reads letter logits "
            f"or generates: set evaluation.answer_mode logits or generate (got {mode!r}) and evaluation.prefill_answer "
            f"false (got {prefill})."
        )
    if prompt_style == "lm_eval" and (mode != "cloze" or prefill):
        raise ValueError(
            f"evaluation.prompt_style 'lm_eval' (the bare question stem) scores option texts and has no answer "
            f"prefix: set evaluation.answer_mode cloze (got {mode!r}) and evaluation.prefill_answer false "
            f"(got {prefill}), or use prompt_style chat."
        )


@documented
@dataclass
class AdaptiveRouteConfig:
    """What the ``adaptive`` route knows: the measured options and the link and latency budget it must meet."""

    profile: str | None = field(
        default=None,
        metadata={"help": "Profile JSON of the options (fedrefine.adaptive_profile, e.g. written by "
                          "benchmarks/codecs.py): development accuracy, bytes and compute time of each route option."},
    )
    mbit_per_s: float = field(default=100.0, metadata={"help": "Link rate to the senders, Mbit/s."})
    rtt_s: float = field(default=0.02, metadata={"help": "Round-trip time to the senders, seconds."})
    budget_s: float = field(default=0.05, metadata={"help": "Latency budget per query, seconds."})
    dev_accuracy_margin: float = field(
        default=0.0,
        metadata={"help": "Development accuracies within this of the best count as a tie, broken by fewer bytes."},
    )


@documented
@dataclass
class EvaluationConfig:
    """How ``validate`` / ``test`` answer and what they report."""

    answer_mode: AnswerMode = field(
        default="logits",
        metadata={"help": "logits (argmax over option letters, deterministic), cloze (option texts' likelihood, "
                          "deterministic) or generate (greedy + extractor)."},
    )
    cloze_normalization: Normalization = field(
        default="token_mean",
        metadata={"help": "How cloze scoring normalises an option's summed log-probability before the argmax "
                          "(the accuracy reported as 'accuracy'): sum (none; lm-eval's acc), chars (per character "
                          "of the option text; lm-eval's acc_norm, the figure usually quoted for OpenBookQA) or "
                          "token_mean (per continuation token). Default token_mean: the project's earlier results "
                          "were measured with it and stay unchanged. Cloze rows always report acc and acc_norm too."},
    )
    prompt_style: PromptStyle = field(
        default="chat",
        metadata={"help": "chat: the project's prompt (chat template, lettered options, instruction, answer "
                          "prefix 'The correct answer is'); lm_eval: lm-eval-harness's stock OpenBookQA prompt (the "
                          "bare question stem, each option scored as ' ' + text), for comparing a model alone "
                          "with published figures: needs answer_mode cloze and runs the receiver and sender "
                          "routes only (fusers are trained on chat prompts); c2c_reference: the C2C reference's "
                          "multiple-choice protocol (its instructions, options 'A. ...', the prompt ending 'The "
                          "correct answer is', letter logits or greedy generation), for imported fusers: receiver, "
                          "sender and c2c routes on the original questions."},
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Generation budget in generate mode and for predict."})
    test_routes: list[str] | None = field(
        default=None, metadata={"help": "Routes test reports (see fedrefine.tasks.routes; None: the module's default)."}
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
    link: LinkConfig = field(
        default_factory=LinkConfig,
        metadata={"help": "How C2C messages travel: codec (fp32 / bf16 / fp16 / int8 / int4 / int2 through the wire "
                          "format, or in-process), layer budget, size limit, and whether training uses them too."},
    )
    adaptive: AdaptiveRouteConfig = field(
        default_factory=AdaptiveRouteConfig,
        metadata={"help": "The adaptive route's profile, link and latency budget."},
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
        try:
            check_normalization(self.cloze_normalization)
        except ValueError as err:
            raise ValueError(f"evaluation.cloze_normalization: {err}") from None
        check_prompt_style(self.prompt_style, self.answer_mode, self.prefill_answer)
