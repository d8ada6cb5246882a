"""Cloze scoring as lm-eval-harness does it: the sum / chars / token_mean normalisations, acc and acc_norm in
every cloze evaluation row, and lm-eval's stock OpenBookQA prompt (the bare stem)."""

from types import SimpleNamespace

import pytest
import torch

from fedrefine.data.question_dataset import QuestionDataset
from fedrefine.evaluation import EvaluationConfig, Evaluator, Variant
from fedrefine.evaluation.report import EvaluationReport
from fedrefine.fuser import Fuser, FuserConfig
from fedrefine.fusion import FusedReceiver
from fedrefine.kv.cache import layers_to_cache
from fedrefine.kv.prompt import PromptState
from fedrefine.tasks.multiple_choice import ClozeOptions, MultipleChoiceItem, encode_question
from fedrefine.tasks.routes import RouteError, parse_routes
from fedrefine.tasks.scoring import OptionScores, continuation_scores, predict_alone
from fedrefine.tasks.t2t import T2TConfig

#: Options of different token and character lengths, so that the normalisations disagree.
ITEMS = [
    MultipleChoiceItem("q0", "Which would let the most heat travel through?",
                       ("a metal spoon", "wood", "the thick wool cloth", "glass"), tuple("ABCD"), "A"),
    MultipleChoiceItem("q1", "What do plants need to make food?", ("sunlight", "a dark cave", "salt", "cold ice water"),
                       tuple("ABCD"), "A"),
    MultipleChoiceItem("q2", "A fox is a kind of", ("animal", "rock that floats", "cloud", "brown dog toy"),
                       tuple("ABCD"), "A"),
    MultipleChoiceItem("q3", "Which is hot?", ("fire", "an ice cube", "snow on a hill"), tuple("ABC"), "A"),
    MultipleChoiceItem("q4", "Where does rain come from?", ("clouds", "the deep sea floor", "a key", "stone"),
                       tuple("ABCD"), "A"),
    MultipleChoiceItem("q5", "What makes a compass needle move?", ("magnets", "a warm cup of tea", "dust", "wind"),
                       tuple("ABCD"), "B"),
]


def test_the_three_normalisations_pick_different_options():
    # option 0: best summed log-probability; option 1: best per character; option 2: best per token
    scores = OptionScores(
        total=torch.tensor([[-4.0, -6.0, -5.0], [-1.0, -2.0, float("-inf")]]),
        tokens=torch.tensor([[1.0, 3.0, 4.0], [1.0, 4.0, 1.0]]),
        chars=torch.tensor([[2.0, 12.0, 3.0], [3.0, 20.0, 1.0]]),
    )
    assert scores.predictions("sum").tolist() == [0, 0]
    assert scores.predictions("chars").tolist() == [1, 1]
    assert scores.predictions("token_mean").tolist() == [2, 1]
    assert torch.equal(scores.normalized("chars")[0], torch.tensor([-2.0, -0.5, -5.0 / 3]))
    assert torch.isinf(scores.normalized("token_mean")[1, 2])  # a missing option stays -inf under every normalisation
    letters = OptionScores(torch.tensor([[0.0, 2.0, 1.0]]))  # letter logits: normalisation does not apply
    assert not letters.cloze and letters.predictions("chars").tolist() == [1]
    with pytest.raises(ValueError, match="Unknown cloze normalization 'mean'.*'sum', 'chars', 'token_mean'"):
        scores.normalized("mean")


def test_continuation_scores_sum_log_probabilities_and_count_lengths():
    vocab = 5
    # a model whose next-token log-probabilities are log(1/2) for token 1 and log(1/8) for the others, everywhere
    logits = torch.full((vocab,), 0.0)
    logits[1] = torch.log(torch.tensor(4.0))
    calls = []

    class Constant(torch.nn.Module):
        def forward(self, input_ids, **kwargs):
            calls.append(tuple(input_ids.shape))
            return SimpleNamespace(logits=logits.expand(input_ids.shape[0], input_ids.shape[1], vocab))

    states = torch.zeros(2, 1, 3, 4)  # the cache of two prompts of three tokens: (B, H, N, D)
    state = PromptState(layers_to_cache([(states, states)]), torch.ones(2, 3, dtype=torch.long), logits.expand(2, vocab))
    options = [
        ClozeOptions(continuations=((1,), (2, 3), (1, 1, 1)), chars=(4, 9, 15)),
        ClozeOptions(continuations=((3,), (1, 1)), chars=(1, 2)),
    ]
    scores = continuation_scores(Constant(), state, options, pad_id=0)
    # one forward for both rows' options, only for those longer than one token; last tokens are never read
    assert calls == [(3, 2)]
    half, eighth = torch.log(torch.tensor(0.5)).item(), torch.log(torch.tensor(0.125)).item()
    assert scores.total[0].tolist() == pytest.approx([half, 2 * eighth, 3 * half])
    assert scores.total[1, :2].tolist() == pytest.approx([eighth, 2 * half]) and torch.isinf(scores.total[1, 2])
    assert scores.tokens.tolist() == [[1, 2, 3], [1, 2, 1]] and scores.chars.tolist() == [[4, 9, 15], [1, 2, 1]]
    assert scores.predictions("sum").tolist() == [0, 1] and scores.predictions("chars").tolist() == [2, 1]


def test_lm_eval_prompt_style_is_the_bare_stem_and_space_plus_option_text(receiver):
    item = ITEMS[0]
    encoded = encode_question(receiver, item, "text", prompt_style="lm_eval")
    tokenizer = receiver.tokenizer
    assert encoded.chat.text == item.question_stem and encoded.chat.content_spans == [(0, len(item.question_stem))]
    assert encoded.chat.input_ids == tokenizer(item.question_stem)["input_ids"]  # no chat template, options or instruction
    assert "<|im_start|>" not in tokenizer.decode(encoded.chat.input_ids)
    for text, continuation in zip(item.choices, encoded.continuations):
        whole = tokenizer(item.question_stem + " " + text)["input_ids"]
        assert continuation == tuple(whole[len(encoded.chat.input_ids) :])  # lm-eval's split: whole minus context
        assert tokenizer.decode(continuation) == " " + text
    assert encoded.cloze.chars == tuple(len(text) for text in item.choices)  # acc_norm counts the text, not the space
    # as lm-eval does, whitespace ending the stem moves to the start of each continuation
    spaced = encode_question(receiver, MultipleChoiceItem("s", "Which is hot?  ", ("fire", "ice"), ("A", "B"), "A"),
                             "text", prompt_style="lm_eval")
    assert spaced.chat.text == "Which is hot?"
    assert [tokenizer.decode(c) for c in spaced.continuations] == ["   fire", "   ice"]
    # the chat style keeps the chat prompt through the answer prefix, options scored the same way after it
    chat = encode_question(receiver, item, "text")
    assert chat.chat.text.startswith("<|im_start|>user\nQuestion: ") and chat.chat.text.endswith("The correct answer is")
    assert [tokenizer.decode(c) for c in chat.continuations] == [" " + text for text in item.choices]
    with pytest.raises(ValueError, match="prompt_style 'lm_eval'.*answer_mode cloze"):
        encode_question(receiver, item, "letter", prompt_style="lm_eval")
    with pytest.raises(ValueError, match="Unknown prompt_style 'harness'"):
        encode_question(receiver, item, "text", prompt_style="harness")


def federated(receiver, senders):
    config = FuserConfig(hidden_size=8)
    fusers = [Fuser(s.identity, receiver.identity, config) for s in senders]
    return FusedReceiver(receiver, senders, fusers, sender_names=["llama", "qwen2"]).eval()


def evaluate(model, routes, **settings):
    config = EvaluationConfig(answer_mode="cloze", t2t=T2TConfig(budget=3), **settings)
    report = Evaluator(model, parse_routes(routes, model.sender_names), config).run(QuestionDataset(ITEMS), batch_size=4)
    return {row["route"]: row for row in report.rows()}


def accuracy(predictions):
    return sum(p == item.answer_index for p, item in zip(predictions, ITEMS)) / len(ITEMS)


@pytest.mark.parametrize("prompt_style", ["chat", "lm_eval"])
def test_cloze_rows_report_acc_and_acc_norm_beside_the_configured_accuracy(receiver, llama_sender, qwen2_sender, prompt_style):
    model = federated(receiver, [llama_sender, qwen2_sender])
    routes = ["receiver", "sender:llama"] + (["c2c", "t2t"] if prompt_style == "chat" else [])
    by = {n: predict_alone(receiver, ITEMS, style="text", normalization=n, prompt_style=prompt_style)
          for n in ("sum", "chars", "token_mean")}
    assert by["sum"] != by["chars"] and by["chars"] != by["token_mean"]  # the settings matter on these questions
    sender = {n: predict_alone(llama_sender, ITEMS, style="text", normalization=n, prompt_style=prompt_style)
              for n in ("sum", "chars")}
    for normalization in ("sum", "chars", "token_mean"):
        rows = evaluate(model, routes, cloze_normalization=normalization, prompt_style=prompt_style)
        assert set(rows) == set(routes)
        for row in rows.values():
            assert {"acc", "acc_norm"} <= set(row)
        assert rows["receiver"]["accuracy"] == pytest.approx(accuracy(by[normalization]))
        assert rows["receiver"]["acc"] == pytest.approx(accuracy(by["sum"]))
        assert rows["receiver"]["acc_norm"] == pytest.approx(accuracy(by["chars"]))
        assert rows["sender:llama"]["acc"] == pytest.approx(accuracy(sender["sum"]))
        assert rows["sender:llama"]["acc_norm"] == pytest.approx(accuracy(sender["chars"]))
        if normalization != "token_mean":
            name = "acc" if normalization == "sum" else "acc_norm"
            assert all(row["accuracy"] == pytest.approx(row[name]) for row in rows.values())


def test_letter_rows_have_no_cloze_accuracies(receiver, llama_sender, qwen2_sender):
    model = federated(receiver, [llama_sender, qwen2_sender])
    report = Evaluator(model, parse_routes(["receiver"], model.sender_names)).run(QuestionDataset(ITEMS), batch_size=4)
    assert not {"acc", "acc_norm"} & set(report.rows()[0])


def test_bad_cloze_settings_are_refused_with_the_setting_named(receiver, llama_sender, qwen2_sender):
    with pytest.raises(ValueError, match="evaluation.cloze_normalization.*'mean'.*'sum', 'chars', 'token_mean'"):
        EvaluationConfig(answer_mode="cloze", cloze_normalization="mean")
    with pytest.raises(ValueError, match="Unknown evaluation.prompt_style 'harness'.*'chat', 'lm_eval'"):
        EvaluationConfig(answer_mode="cloze", prompt_style="harness")
    with pytest.raises(ValueError, match="prompt_style 'lm_eval'.*answer_mode cloze \\(got 'logits'\\)"):
        EvaluationConfig(prompt_style="lm_eval")
    with pytest.raises(ValueError, match="prompt_style 'lm_eval'.*prefill_answer false \\(got True\\)"):
        EvaluationConfig(answer_mode="cloze", prompt_style="lm_eval", prefill_answer=True)
    model = federated(receiver, [llama_sender, qwen2_sender])
    config = EvaluationConfig(answer_mode="cloze", prompt_style="lm_eval")
    for route in ("c2c", "t2t", "receiver@shared"):
        with pytest.raises(RouteError, match=f"prompt_style 'lm_eval'.*\\['{route}'\\].*'receiver' and 'sender:<name>'"):
            Evaluator(model, parse_routes([route], model.sender_names), config)


class Reads:
    """Every forward of a model during an evaluation: (rows, tokens, whether it ran option continuations)."""

    def __init__(self, model, monkeypatch):
        import fedrefine.tasks.scoring as scoring

        self.calls, self._continuing = [], False
        self._hook = model.register_forward_hook(self._record, with_kwargs=True)
        original = scoring.continuation_logits

        def continuation_logits(*args, **kwargs):
            self._continuing = True
            try:
                return original(*args, **kwargs)
            finally:
                self._continuing = False

        monkeypatch.setattr(scoring, "continuation_logits", continuation_logits)

    def _record(self, module, args, kwargs, output):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        self.calls.append((*ids.shape, self._continuing))

    @property
    def prompt_reads(self):
        return [(rows, tokens) for rows, tokens, continuing in self.calls if not continuing]

    @property
    def continuations(self):
        return [(rows, tokens) for rows, tokens, continuing in self.calls if continuing]


def counted_fusion(model, monkeypatch):
    """Calls of the receiver's fusion strategy and of each fuser (the hooks go with ``monkeypatch``'s undo)."""
    counts = {"fusions": 0, "fuser_calls": 0}
    prepare = model.strategy.prepare

    def counted_prepare(*args, **kwargs):
        counts["fusions"] += 1
        return prepare(*args, **kwargs)

    def counted(forward):
        def call(*args, **kwargs):
            counts["fuser_calls"] += 1
            return forward(*args, **kwargs)

        return call

    monkeypatch.setattr(model.strategy, "prepare", counted_prepare)
    for fuser in model.fusers:
        monkeypatch.setattr(fuser, "forward", counted(fuser.forward))
        streams = fuser.inference_streams  # last-token fusion in inference runs each layer's streams (a call per layer)

        def counted_streams(streams=streams):
            stack, by_layer = streams()
            return stack, {i: counted(s) for i, s in by_layer.items()}

        monkeypatch.setattr(fuser, "inference_streams", counted_streams)
    return counts


@pytest.mark.parametrize("fuse_at", ["prompt", "last"])
def test_a_cloze_question_reads_its_prompt_and_fuses_once_whatever_its_options(monkeypatch, receiver, llama_sender, qwen2_sender, fuse_at):
    """Cloze scoring reads each prompt once (a fused one: the senders send once and the receiver fuses once) and
    scores every option from that read: at most one more forward for all options' later tokens, whatever the
    number of options."""
    config = FuserConfig(hidden_size=8, fuse_at=fuse_at)
    fusers = [Fuser(s.identity, receiver.identity, config) for s in (llama_sender, qwen2_sender)]
    model = FusedReceiver(receiver, [llama_sender, qwen2_sender], fusers, sender_names=["llama", "qwen2"]).eval()
    settings = EvaluationConfig(answer_mode="cloze", prefill_answer=fuse_at == "last", t2t=T2TConfig(budget=3))
    questions = QuestionDataset(ITEMS)
    for route, reader in (("receiver", receiver), ("c2c", receiver), ("sender:llama", llama_sender), ("t2t:llama", receiver)):
        evaluator = Evaluator(model, parse_routes([route], model.sender_names), settings)
        batch = evaluator.encode([questions[i] for i in range(len(ITEMS))])
        with monkeypatch.context() as patched:
            reads, fusion = Reads(reader.model, patched), counted_fusion(model, patched)
            try:
                evaluator.answer(batch, EvaluationReport(evaluator.routes))
            finally:
                reads._hook.remove()
        assert len(reads.continuations) <= 1, route  # every option of every question in one forward
        if route == "t2t:llama":
            assert len(reads.prompt_reads) == 1  # the receiver reads the hinted prompts once (one T2T batch)
        else:  # every prompt token of every question read exactly once
            alone = route.startswith("sender")
            prompt = batch.alone["llama"].input_ids if alone else batch.fusion[Variant("item", "original")].receiver_input_ids
            assert sum(rows * tokens for rows, tokens in reads.prompt_reads) == prompt.numel(), route
            assert all(rows == len(ITEMS) for rows, _ in reads.prompt_reads), route
        fused = route == "c2c"
        assert fusion["fusions"] == int(fused), route
        layers = receiver.identity.num_layers if fuse_at == "last" else 1  # last-token fusion fuses as layers are written
        assert fusion["fuser_calls"] == (2 * layers if fused else 0), route
