"""The lm-eval adapter (fedrefine.harness): prompts, routes, scoring against direct computation, refusals, toy tasks."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from fedrefine.harness import register  # noqa: E402
from fedrefine.harness.cli import lm_eval_argv, main  # noqa: E402
from fedrefine.harness.contexts import Context, split_trailing_space  # noqa: E402
from fedrefine.harness.loading import load_module, with_overrides  # noqa: E402
from fedrefine.harness.model import FedRefineLM, batch_size_of, cut_at  # noqa: E402
from fedrefine.harness.routes import FormatError, hinted_messages, with_last_user_message  # noqa: E402
from fedrefine.harness.toy_tasks import GEN_TASK, MC_TASK, toy_rows, write_toy_tasks  # noqa: E402
from fedrefine.settings import SettingsError  # noqa: E402
from fedrefine.tasks.multiple_choice import ANSWER_PREFIX  # noqa: E402
from fedrefine.tasks.routes import RouteError  # noqa: E402
from fedrefine.tasks.t2t import T2TConfig  # noqa: E402

#: A C2C config over two toy-world participants and a fresh (untrained) fuser: offline and small.
CONFIG = """
seed_everything: 0
model:
  class_path: fedrefine.recipes.C2CModule
  init_args:
    receiver: {class_path: fedrefine.toyworld.lightning.ToyParticipant, init_args: {name: receiver}}
    sender: {class_path: fedrefine.toyworld.lightning.ToyParticipant, init_args: {name: llama-sender}}
    fuser: {hidden_size: 32, num_blocks: 2, fuse_at: last}
    evaluation: {answer_mode: cloze, prefill_answer: true}
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("harness") / "c2c.yaml"
    path.write_text(CONFIG)
    return str(path)


@pytest.fixture(scope="module")
def models(config) -> dict[str, FedRefineLM]:
    register()
    lms = {route: FedRefineLM(config=config, route=route, batch_size=2) for route in ("receiver", "c2c", "t2t")}
    generator = torch.Generator().manual_seed(0)
    for parameter in lms["c2c"].fused.fusers.parameters():  # an untrained fuser adds nothing yet: make it write
        parameter.data.normal_(0.0, 0.3, generator=generator)
    return lms


def request(*args):
    return SimpleNamespace(args=args)


def chat_prompt(lm: FedRefineLM, question: str) -> str:
    return lm.apply_chat_template([{"role": "user", "content": question}, {"role": "assistant", "content": ANSWER_PREFIX}], False)


def direct_loglikelihood(participant, context_ids: list[int], continuation_ids: list[int]) -> float:
    """The continuation's summed log-probability from one plain forward of the whole sequence."""
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logits = participant.model(input_ids=ids).logits[0].float().log_softmax(-1)  # (N, V)
    rows = torch.arange(len(context_ids) - 1, ids.shape[1] - 1)
    return float(logits[rows, torch.tensor(continuation_ids)].sum())


def test_contexts_remember_the_conversation_behind_a_rendering(models):
    lm = models["receiver"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Question: who?"}]
    text = lm.apply_chat_template(messages)
    context = lm.contexts.context(text)
    assert context.chat and list(context.messages) == messages and context.add_generation_prompt
    assert context.last_user_content() == "Question: who?"
    assert not lm.contexts.context("plain text").chat
    assert split_trailing_space("abc \n") == ("abc", " \n")
    prefilled = lm.contexts.context(chat_prompt(lm, "Question: who?"))
    assert prefilled.prefilled and prefilled.text.endswith(ANSWER_PREFIX)


def test_receiver_loglikelihood_matches_a_plain_forward(models):
    lm = models["receiver"]
    participant, tokenizer = lm.fused.receiver, lm.fused.receiver.tokenizer
    rows = toy_rows(limit=2)
    requests = [request(chat_prompt(lm, row["prompt"]), " " + option) for row in rows for option in row["choices"]["text"]]
    results = lm.loglikelihood(requests, disable_tqdm=True)
    assert len(results) == len(requests)
    for req, (total, greedy) in zip(requests, results):
        context, continuation = req.args
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        continuation_ids = tokenizer(context + continuation, add_special_tokens=False)["input_ids"][len(context_ids) :]
        assert total == pytest.approx(direct_loglikelihood(participant, context_ids, continuation_ids), abs=1e-4)
        assert isinstance(greedy, bool)


def test_batching_and_grouping_leave_fused_scores_unchanged(config, models):
    lm = models["c2c"]
    rows = toy_rows(limit=3)
    requests = [request(chat_prompt(lm, row["prompt"]), " " + option) for row in rows for option in row["choices"]["text"]]
    together = lm.loglikelihood(requests, disable_tqdm=True)
    one_by_one = [lm.loglikelihood([r], disable_tqdm=True)[0] for r in requests]
    assert [t for t, _ in together] == pytest.approx([t for t, _ in one_by_one], abs=1e-4)
    alone = models["receiver"].loglikelihood(requests, disable_tqdm=True)
    assert [t for t, _ in together] != pytest.approx([t for t, _ in alone], abs=1e-4)  # the fuser does something


def test_fused_routes_refuse_formats_they_were_not_trained_on(config, models):
    with pytest.raises(FormatError, match="--apply_chat_template"):
        models["c2c"].loglikelihood([request("Question: who?", " Ana")], disable_tqdm=True)
    unprefilled = models["c2c"].apply_chat_template([{"role": "user", "content": "Question: who?"}])
    with pytest.raises(FormatError, match="gen_prefix"):
        models["c2c"].loglikelihood([request(unprefilled, " Ana")], disable_tqdm=True)
    no_prefill = FedRefineLM(config=config, route="c2c", prefill_answer=False)
    assert len(no_prefill.loglikelihood([request(no_prefill.apply_chat_template([{"role": "user", "content": "Hi?"}]), " Ana")],
                                        disable_tqdm=True)) == 1
    with pytest.raises(FormatError, match="route=receiver"):
        models["c2c"].loglikelihood_rolling([request("some text")], disable_tqdm=True)
    with pytest.raises(FormatError, match="do_sample"):
        models["receiver"].generate_until([request("Question: who?", {"do_sample": True})], disable_tqdm=True)


def test_routes_that_need_multiple_choice_items_are_refused(config):
    for route in ("c2c@shared", "c2c_mismatched", "t2t@shared", "c2c:auto"):
        with pytest.raises(RouteError, match="text only"):
            FedRefineLM(config=config, route=route)
    with pytest.raises(RouteError, match="Unknown sender"):
        FedRefineLM(config=config, route="c2c:nobody")


def test_loglikelihood_rolling_sums_every_token(models):
    lm = models["receiver"]
    participant, tokenizer = lm.fused.receiver, lm.fused.receiver.tokenizer
    text = "Ana lives in Paris"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    (total,) = lm.loglikelihood_rolling([request(text)], disable_tqdm=True)
    assert total == pytest.approx(direct_loglikelihood(participant, [prefix], ids), abs=1e-4)


def test_generate_until_stops_at_until_and_answers_each_context_once(models):
    lm = models["receiver"]
    prompt = chat_prompt(lm, toy_rows(limit=1)[0]["prompt"])
    settings = {"until": ["."], "max_gen_toks": 6}
    first, second = lm.generate_until([request(prompt, settings), request(prompt, dict(settings))], disable_tqdm=True)
    assert first == second and "." not in first
    assert cut_at("a b. c\n", [".", "\n"]) == "a b"


def test_hints_go_where_t2t_places_them():
    messages = ({"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"})
    placed = hinted_messages(messages, [" h1 ", ""], T2TConfig(hint_header="H:\n"))
    assert placed[1]["content"] == "H:\nh1\n\nQ?" and placed[0] == messages[0] and placed[2] == messages[2]
    dialogue = hinted_messages(messages, ["h1"], T2TConfig(placement="dialogue"))
    assert [m["role"] for m in dialogue] == ["system", "user", "assistant", "user", "assistant"]
    assert hinted_messages(messages, ["  "], T2TConfig()) == messages


def test_model_arguments(tmp_path):
    assert with_overrides({"a": {"b": 1}, "c": 2}, {"a.b": 3, "d": 4}) == {"a": {"b": 3}, "c": 2, "d": 4}
    with pytest.raises(SettingsError, match="c is not a group"):
        with_overrides({"c": 2}, {"c.x": 1})
    with pytest.raises(FileNotFoundError, match="config=nope.yaml"):
        load_module("nope.yaml")
    (tmp_path / "bad.yaml").write_text("trainer: {}\n")
    with pytest.raises(SettingsError, match="no model section"):
        load_module(tmp_path / "bad.yaml")
    assert batch_size_of("auto", None) == 64 and batch_size_of("auto:4", 8) == 8 and batch_size_of(32, 16) == 16
    with pytest.raises(ValueError, match="positive"):
        batch_size_of(0, None)


def test_toy_tasks_are_found_and_evaluated_by_lm_eval(tmp_path, models):
    from lm_eval.tasks import TaskManager

    paths = write_toy_tasks(tmp_path, limit=3)
    assert set(paths) == {MC_TASK, GEN_TASK} and all(p.is_file() for p in paths.values())
    rows = [json.loads(line) for line in (tmp_path / "toy_held_out.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["answer"] in rows[0]["choices"]["text"]
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    for chat in (False, True):
        results = lm_eval.simple_evaluate(model=models["receiver"], tasks=[MC_TASK, GEN_TASK], num_fewshot=0,
                                          apply_chat_template=chat, task_manager=manager, log_samples=True)
        assert set(results["results"][MC_TASK]) >= {"acc,none", "acc_norm,none"}
        assert 0.0 <= results["results"][GEN_TASK]["exact_match,strip"] <= 1.0
    results = lm_eval.simple_evaluate(model=models["c2c"], tasks=[MC_TASK], num_fewshot=0, apply_chat_template=True,
                                      task_manager=manager)
    assert "acc,none" in results["results"][MC_TASK]


def test_command_line(tmp_path, config, capsys):
    assert lm_eval_argv(["--tasks", "x"]) == ["run", "--model", "fedrefine", "--tasks", "x"]
    assert lm_eval_argv(["run", "--model=hf"]) == ["run", "--model=hf"]
    main(["toy-tasks", str(tmp_path), "--limit", "2"])
    assert MC_TASK in capsys.readouterr().out and (tmp_path / f"{GEN_TASK}.yaml").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["--model_args", f"config={config},route=c2c@shared", "--tasks", MC_TASK, "--include_path", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "error: Route 'c2c@shared'" in capsys.readouterr().err
    assert Context("x").messages is None and Path(config).is_file()


def test_registering_keeps_lm_evals_own_models():
    from lm_eval.api.registry import get_model

    assert register() is get_model("fedrefine") and get_model("hf").__name__ == "HFLM"


def test_t2t_reads_the_senders_hints_in_its_prompt(models):
    lm, question = models["t2t"], toy_rows(limit=1)[0]["prompt"]
    prompt = chat_prompt(lm, question)
    (hinted,) = lm.answering.hinted([lm.contexts.context(prompt)])
    user, prefix = hinted.messages
    assert user["content"].startswith(T2TConfig().hint_header) and user["content"].endswith(question)
    assert prefix == {"role": "assistant", "content": ANSWER_PREFIX}
    ((with_hints, _),) = lm.loglikelihood([request(prompt, " Ana")], disable_tqdm=True)
    ((alone, _),) = models["receiver"].loglikelihood([request(prompt, " Ana")], disable_tqdm=True)
    assert with_hints != pytest.approx(alone, abs=1e-4)


def test_private_senders_read_only_a_rephrasing(config, models):
    lm = FedRefineLM(config=config, route="c2c@private")
    question = toy_rows(limit=1)[0]["prompt"]
    context = lm.contexts.context(chat_prompt(lm, question))
    ((rephrased,),) = lm.answering.queries.texts([context]).values()
    assert rephrased != question
    messages = ({"role": "system", "content": "S"}, {"role": "user", "content": question}, {"role": "assistant", "content": "P"})
    assert with_last_user_message(messages, "R", private=True) == ({"role": "user", "content": "R"}, messages[2])
    assert with_last_user_message(messages, "R", private=False)[0] == messages[0]
    ((private, _),) = lm.loglikelihood([request(context.text, " Ana")], disable_tqdm=True)
    assert isinstance(private, float)
    multiturn = lm.apply_chat_template([{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                                        {"role": "user", "content": question}, {"role": "assistant", "content": ANSWER_PREFIX}], False)
    with pytest.raises(FormatError, match="fewshot_as_multiturn"):
        lm.loglikelihood([request(multiturn, " Ana")], disable_tqdm=True)


def test_a_template_that_cannot_render_the_conversation_is_one_line():
    from jinja2.exceptions import TemplateError

    from fedrefine.harness.contexts import ChatContexts

    def refuse(*args, **kwargs):
        raise TemplateError("System role not supported")

    tokenizer = SimpleNamespace(chat_template="{{ x }}", apply_chat_template=refuse)
    contexts = ChatContexts(SimpleNamespace(name="r", tokenizer=tokenizer, chat_template_kwargs={}))
    with pytest.raises(FormatError, match="System role not supported.*drop --system_instruction"):
        contexts.render([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}])
