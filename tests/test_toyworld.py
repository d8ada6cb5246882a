"""The toy world: deterministic content, disjoint splits, valid rows, export, cache keys, pretraining."""

import random
from collections import Counter
from dataclasses import replace

import pytest
import torch

from fedrefine.participants import TinySpec, build_tiny_participant
from fedrefine.tasks.multiple_choice import MultipleChoiceItem, correct_answer, question_text
from fedrefine.toyworld import (
    PretrainConfig,
    ToyParticipantConfig,
    ToyWorld,
    WorldConfig,
    build_toy_world,
    default_cache_dir,
    export_world,
    load_toy_participants,
    read_jsonl,
    read_toy_metadata,
    toyworld_key,
)
from fedrefine.toyworld.corpus import ANSWER, IGNORE, build_corpus, encode_question_answer
from fedrefine.toyworld.pretrain import pretrain, toy_tokenizer
from fedrefine.toyworld.world import Fact, _deal_option_blocks

SMALL = WorldConfig(seed=3, num_entities=24, attributes=("colour", "city"), values_per_attribute=5, num_private_groups=2,
                    public_fraction=1 / 3, held_out_fraction=0.25, num_fictional=4)
TINY_PARTICIPANTS = (
    ToyParticipantConfig(
        TinySpec("receiver", "qwen3", num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16,
                 intermediate_size=64, tokenizer_kind="word", vocab_size=512)
    ),
    ToyParticipantConfig(
        TinySpec("sender", "llama", num_layers=1, hidden_size=24, num_heads=3, num_kv_heads=1, head_dim=8,
                 intermediate_size=48, tokenizer_kind="word", chat_style="llama3", vocab_size=512, seed=1),
        private_groups=(0,),
    ),
)
FEW_STEPS = PretrainConfig(statement_steps=2, question_steps=2, batch_size=4, warmup_steps=1)


@pytest.fixture(scope="module")
def world():
    return ToyWorld(SMALL)


def test_world_is_deterministic_from_its_seed(world):
    again = ToyWorld(SMALL)
    assert again.names == world.names
    assert again.question_rows(again.names) == world.question_rows(world.names)
    assert (again.public, again.private_groups) == (world.public, world.private_groups)
    assert again.fingerprint == world.fingerprint
    other = ToyWorld(replace(SMALL, seed=4))
    assert other.names != world.names and other.fingerprint != world.fingerprint


def test_names_are_unique_single_words(world):
    assert len(set(world.names)) == len(world.names) == SMALL.num_entities
    assert all(name.isalpha() and name[0].isupper() for name in world.names)


def test_splits_are_disjoint_and_cover_every_entity(world):
    public = set(world.public)
    train = [set(world.fuser_train(g)) for g in range(world.num_groups)]
    held = [set(world.held_out(g)) for g in range(world.num_groups)]
    parts = [public, *train, *held]
    assert all(parts), "every split is non-empty"
    assert sum(len(p) for p in parts) == len(set().union(*parts)) == SMALL.num_entities
    assert set(world.held_out()) == held[0] | held[1]
    for group in range(world.num_groups):
        assert set(world.private_groups[group]) == train[group] | held[group]
        for name in held[group]:
            assert world.split_of(name) == ("held_out", group)
    # Fuser training never sees a held-out entity; evaluation only asks about held-out ones.
    for group in range(world.num_groups):
        trained_on = {row["id"].split("-")[0] for row in world.fuser_train_rows(group)}
        assert trained_on.isdisjoint(world.held_out())
        assert trained_on == public | train[group]
    assert {row["id"].split("-")[0] for row in world.eval_rows()} == set(world.held_out())
    # Adding a sender's group adds knowledge.
    assert set(world.known_by([0])) < set(world.known_by([0, 1]))
    assert set(world.known_by([])) == public


def test_rows_validate_and_answers_are_position_balanced(world):
    rows = world.question_rows(world.names)
    items = [MultipleChoiceItem.from_row(row, where=f"row {i}") for i, row in enumerate(rows)]
    assert len(items) == 4 * len(world.facts(world.names))
    assert len({item.id for item in items}) == len(items)
    assert Counter(item.answer_key for item in items) == {label: len(items) // 4 for label in "ABCD"}
    by_fact = {}
    for item in items:
        by_fact.setdefault(item.id.rsplit("-", 1)[0], []).append(item)
    for questions in by_fact.values():
        assert sorted(q.answer_key for q in questions) == ["A", "B", "C", "D"]
        assert len({q.choices[q.answer_index] for q in questions}) == 1, "same correct value at every position"
        assert len({frozenset(q.choices) for q in questions}) == 1 and len(set(questions[0].choices)) == 4
    fact = world.facts(world.names[:1])[0]
    assert fact.value in fact.statement() and fact.entity in fact.statement()
    assert set(fact.distractors) <= set(world.values[fact.attribute]) - {fact.value}


def test_a_reader_without_the_facts_scores_chance_on_every_split():
    """Options are dealt in blocks: any fixed preference among the values scores exactly 25% on every split's
    facts of one attribute, unless one value holds more than a quarter of them (one column of the default
    world: 14 of group 1's 48 held-out entities like rice); the whole split stays within 2.5 points."""
    world = ToyWorld()
    splits = [world.public, *(world.fuser_train(g) for g in range(4)), *(world.held_out(g) for g in range(4))]
    rng = random.Random(0)
    exact_columns = 0
    for _ in range(8):
        preference = {attribute: rng.sample(values, len(values)) for attribute, values in world.values.items()}
        for split in splits:
            facts = world.facts(split)
            right = {f: min((f.value, *f.distractors), key=preference[f.attribute].index) == f.value for f in facts}
            assert abs(sum(right.values()) / len(facts) - 0.25) <= 0.025
            for attribute in world.config.attributes:
                column = [f for f in facts if f.attribute == attribute]
                if max(Counter(f.value for f in column).values()) <= len(column) / 4:
                    assert 4 * sum(right[f] for f in column) == len(column)
                    exact_columns += 1
    assert exact_columns >= 8 * (len(splits) * len(world.config.attributes) - 1)


def test_option_blocks_keep_every_fact_and_never_offer_its_value_twice():
    values = ("red", "blue", "green", "pink", "grey")
    facts = [Fact(f"E{i}", "colour", value, ("x", "y", "z")) for i, value in enumerate("red red red blue green red".split())]
    dealt = _deal_option_blocks(random.Random(1), facts, values)
    assert sorted(dealt) == sorted(f.entity for f in facts)
    for fact in facts:  # the value stays; three distinct other values of the attribute around it
        again = dealt[fact.entity]
        assert again.value == fact.value and len(set(again.distractors)) == 3
        assert set(again.distractors) <= set(values) - {fact.value}


def test_jsonl_export_round_trips(world, tmp_path):
    paths = export_world(world, tmp_path)
    eval_rows = read_jsonl(paths["eval_held_out"])
    assert eval_rows == world.eval_rows()
    assert [MultipleChoiceItem.from_row(r) for r in read_jsonl(paths["eval_group1"])] == world.questions(world.held_out(1))
    train = read_jsonl(paths["train_group0"])
    assert train == world.fuser_train_rows(0)
    item = world.questions(world.public)[0]
    assert train[0]["conversations"] == [
        {"from": "human", "value": question_text(item, "text")},
        {"from": "gpt", "value": correct_answer(item, "text")},
    ]
    assert read_jsonl(paths["eval_public"]) == world.question_rows(world.public)


def test_question_encoding_masks_names_and_marks_the_answer(world):
    config = TINY_PARTICIPANTS[0]
    participant = build_tiny_participant(config.spec, tokenizer=toy_tokenizer(config, world))
    item = world.questions(world.public[:1])[1]
    text = encode_question_answer(participant, item, world.public[0])
    tokens = participant.tokenizer.convert_ids_to_tokens(text.input_ids)
    answer = "".join(participant.tokenizer.decode([text.input_ids[i]]) for i, k in enumerate(text.kinds) if k == ANSWER)
    assert answer.strip() == item.choices[item.answer_index]  # the option's text, cloze style
    assert [tokens[i].strip() for i, k in enumerate(text.kinds) if k == IGNORE] == [world.public[0]]
    assert text.input_ids[-1] == participant.end_of_turn_token_id


def test_tokenizers_differ_between_participants(world):
    receiver, sender = (toy_tokenizer(c, world) for c in TINY_PARTICIPANTS)
    assert receiver.get_vocab() != sender.get_vocab()
    for tokenizer in (receiver, sender):  # every name, even unknown ones, is one known token
        ids = tokenizer(" ".join(world.names), add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        question = question_text(world.questions(world.held_out(1)[:1])[0], "text")
        assert tokenizer.unk_token_id not in tokenizer(question, add_special_tokens=False)["input_ids"]


def test_pretraining_lowers_the_loss_deterministically(world):
    config = TINY_PARTICIPANTS[1]
    recipe = PretrainConfig(statement_steps=15, question_steps=15, batch_size=8, warmup_steps=3, learning_rate=1e-2)

    def run():
        participant = build_tiny_participant(config.spec, tokenizer=toy_tokenizer(config, world))
        losses = pretrain(participant, build_corpus(participant, world, config.private_groups), recipe, progress=False)
        return participant, losses

    participant, losses = run()
    assert sum(losses[10:15]) < sum(losses[:5])  # statement stage
    assert sum(losses[-5:]) < sum(losses[15:20])  # question stage
    assert not participant.model.training and not any(p.requires_grad for p in participant.model.parameters())
    again, losses_again = run()
    assert losses_again == losses
    for a, b in zip(participant.model.parameters(), again.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cache_key_tracks_every_config(world):
    key = toyworld_key(world, TINY_PARTICIPANTS, FEW_STEPS)
    assert key == toyworld_key(ToyWorld(SMALL), TINY_PARTICIPANTS, PretrainConfig(**vars(FEW_STEPS)))
    assert key != toyworld_key(ToyWorld(replace(SMALL, seed=9)), TINY_PARTICIPANTS, FEW_STEPS)
    assert key != toyworld_key(world, TINY_PARTICIPANTS, replace(FEW_STEPS, learning_rate=1e-4))
    changed = (TINY_PARTICIPANTS[0], replace(TINY_PARTICIPANTS[1], private_groups=(1,)))
    assert key != toyworld_key(world, changed, FEW_STEPS)
    resized = (replace(TINY_PARTICIPANTS[0], spec=replace(TINY_PARTICIPANTS[0].spec, num_layers=3)), TINY_PARTICIPANTS[1])
    assert key != toyworld_key(world, resized, FEW_STEPS)


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDREFINE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "toyworld"
    monkeypatch.delenv("FEDREFINE_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "fedrefine", "toyworld")


def test_build_is_cached_and_participants_load_with_the_key(tmp_path, monkeypatch):
    directory = build_toy_world(SMALL, TINY_PARTICIPANTS, FEW_STEPS, cache_dir=tmp_path, progress=False)
    assert directory == tmp_path / toyworld_key(ToyWorld(SMALL), TINY_PARTICIPANTS, FEW_STEPS)
    assert read_toy_metadata(directory)["training"]["sender"]["num_statements"] == 2 * len(ToyWorld(SMALL).known_by([0]))

    import fedrefine.toyworld.pretrain as module

    def no_training(*args, **kwargs):
        raise AssertionError("a cached toy world was rebuilt")

    monkeypatch.setattr(module, "pretrain", no_training)
    participants = load_toy_participants(SMALL, TINY_PARTICIPANTS, FEW_STEPS, cache_dir=tmp_path, progress=False)
    assert set(participants) == {"receiver", "sender"}
    sender = participants["sender"]
    assert sender.identity.revision == directory.name
    assert sender.identity.name_or_path == "toyworld/sender"
    assert sender.identity.architecture == "LlamaForCausalLM" and sender.identity.num_layers == 1
    assert not any(p.requires_grad for p in sender.model.parameters())
    with pytest.raises(AssertionError, match="rebuilt"):  # another recipe is another key: it would train
        build_toy_world(SMALL, TINY_PARTICIPANTS, replace(FEW_STEPS, seed=1), cache_dir=tmp_path, progress=False)


def test_shipped_pretrained_world_matches_the_default_recipe():
    """The package ships the default world's participants; a changed recipe or world needs a rebuild."""
    from fedrefine.toyworld import DEFAULT_PARTICIPANTS
    from fedrefine.toyworld.pretrain import shipped_dir

    key = toyworld_key(ToyWorld(), DEFAULT_PARTICIPANTS, PretrainConfig())
    shipped = sorted(p.name for p in shipped_dir().iterdir() if p.is_dir()) if shipped_dir().is_dir() else []
    assert shipped == [key], (
        f"src/fedrefine/toyworld/pretrained holds {shipped}, the defaults need {key}: "
        "run `python benchmarks/toyworld_pretrain.py --threads 2 --ship` and remove stale directories."
    )
    metadata = read_toy_metadata(shipped_dir() / key)
    assert [p["spec"]["name"] for p in metadata["participants"]] == [p.name for p in DEFAULT_PARTICIPANTS]


def _trained_entities(datamodule):
    datamodule.prepare_data()
    return {row["id"].split("-")[0] for row in read_jsonl(datamodule.train_path)}


def test_data_module_trains_on_one_or_several_private_groups(tmp_path):
    from fedrefine.toyworld.lightning import ToyWorldDataModule

    world = ToyWorld()
    fit = [set(world.fuser_train(g)[16:]) for g in range(world.num_groups)]
    one = ToyWorldDataModule(group=1, data_dir=str(tmp_path))
    assert _trained_entities(one) == set(world.public) | fit[1]  # the default: the tested group only
    both = ToyWorldDataModule(group=0, train_groups=[0, 1], include_public=False, data_dir=str(tmp_path))
    assert _trained_entities(both) == fit[0] | fit[1]  # each group's development entities stay apart
    assert {row["id"].split("-")[0] for row in read_jsonl(tmp_path / "seed0" / "val_group1.jsonl")} == set(
        world.fuser_train(1)[:16]
    )


def test_data_module_tests_on_the_development_or_the_trained_entities(tmp_path):
    """``test_split: val`` asks about the group's development entities, ``fit`` about exactly the entities the fuser
    trains on (the train/development gap of benchmarks/toyworld_fidelity.py); neither touches held-out ones."""
    from fedrefine.toyworld.lightning import ToyWorldDataModule

    world = ToyWorld()
    entities = {}
    for split in ("val", "fit", "held_out"):
        datamodule = ToyWorldDataModule(group=2, include_public=False, test_split=split, data_dir=str(tmp_path))
        datamodule.prepare_data()
        rows = read_jsonl(tmp_path / "seed0" / f"{datamodule.test_split}.jsonl")
        entities[split] = {row["id"].split("-")[0] for row in rows}
        assert len(rows) == 4 * len(world.config.attributes) * len(entities[split])  # every fact, answer at A-D
    assert entities["val"] == set(world.fuser_train(2)[:16])
    assert entities["fit"] == _trained_entities(datamodule) == set(world.fuser_train(2)[16:])
    assert entities["held_out"] == set(world.held_out(2))
    assert not (entities["val"] | entities["fit"]) & entities["held_out"]


def test_co_c2c_on_the_toy_world_trains_both_directions_and_tests_the_smaller_model_as_receiver(tmp_path):
    """A few steps of Co-C2C between the receiver (the smallest model) and the llama sender; the
    accuracy claim lives in benchmarks/results/toyworld_co_c2c.md."""
    import lightning as L

    from fedrefine.evaluation import EvaluationConfig
    from fedrefine.fuser import FuserConfig
    from fedrefine.fuser.registry import FuserRegistry
    from fedrefine.recipes import CoC2CModule
    from fedrefine.toyworld.lightning import ToyParticipant, ToyWorldDataModule

    def trainer(**kwargs):
        return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0, **kwargs)

    def data():
        return ToyWorldDataModule(group=0, include_public=False, data_dir=str(tmp_path / "data"), batch_size=8,
                                  num_questions=8, eval_batch_size=8)

    small, large = ToyParticipant("receiver"), ToyParticipant("llama-sender")
    sizes = [sum(p.numel() for p in source.load().model.parameters()) for source in (small, large)]
    assert sizes[0] < sizes[1]
    registry = str(tmp_path / "registry")
    module = CoC2CModule(small, large, FuserConfig(hidden_size=16, dropout=0.0), learning_rate=1e-2, registry=registry)
    before = {role: [p.clone() for p in model.fusers.parameters()] for role, model in module.directions.items()}
    trainer(max_steps=2).fit(module, data())
    for role, model in module.directions.items():
        assert any(not torch.equal(a, b) for a, b in zip(before[role], model.fusers.parameters())), role
    assert len(FuserRegistry(registry).pairs()) == 2

    evaluated = CoC2CModule(small, large, registry=registry, from_registry=True, eval_receiver="first",
                            evaluation=EvaluationConfig(answer_mode="cloze"))
    for role, model in evaluated.directions.items():
        for a, b in zip(module.directions[role].fusers.parameters(), model.fusers.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    trainer().test(evaluated, data())
    assert evaluated.title() == "toyworld/llama-sender -> toyworld/receiver"
    rows = evaluated.results()
    assert [r["route"] for r in rows] == ["receiver", "sender", "c2c"] and all(r["questions"] == 8 for r in rows)
    with pytest.raises(ValueError, match="registry"):
        CoC2CModule(small, large, from_registry=True)


def fit_and_test_on_held_out(module, data, tmp_path, steps: int = 100) -> tuple[dict[str, float], int]:
    """Train ``module`` for ``steps`` on the toy world, test it; accuracy per route and the number of questions."""
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0, max_steps=steps,
                        gradient_clip_val=1.0)
    trainer.fit(module, data)
    trainer.test(module, data)
    return {row["route"]: row["accuracy"] for row in module.results()}, module.results()[0]["questions"]


@pytest.mark.slow
def test_co_c2c_lifts_the_smaller_model_on_facts_only_the_larger_one_knows(tmp_path):
    """100 Co-C2C steps with the README recipe (both directions train): the smallest toy model, as receiver,
    answers the held-out entities of the llama sender's group far above its own chance-level accuracy
    (~30 s on 2 CPU cores)."""
    import lightning as L

    from fedrefine.evaluation import EvaluationConfig
    from fedrefine.fuser import FuserConfig
    from fedrefine.recipes import CoC2CModule
    from fedrefine.tasks.multiple_choice import ANSWER_PREFIX
    from fedrefine.toyworld.lightning import ToyParticipant, ToyWorldDataModule

    L.seed_everything(0)
    module = CoC2CModule(
        ToyParticipant("receiver"), ToyParticipant("llama-sender"),
        FuserConfig(hidden_size=128, dropout=0.0, gate_init=2.0, fuse_at="last"),
        learning_rate=3e-3, warmup_fraction=0.05, registry=str(tmp_path / "registry"),
        evaluation=EvaluationConfig(answer_mode="cloze", prefill_answer=True, test_routes=["receiver", "c2c"]),
    )
    data = ToyWorldDataModule(group=0, include_public=False, data_dir=str(tmp_path / "data"), batch_size=32,
                              response_prefill=ANSWER_PREFIX)
    accuracy, questions = fit_and_test_on_held_out(module, data, tmp_path)
    assert questions == 768  # every held-out group-0 fact (48 entities x 4 attributes), answer at each of A-D
    assert accuracy["receiver"] <= 0.30
    assert accuracy["c2c"] >= accuracy["receiver"] + 0.10, accuracy


@pytest.mark.slow
def test_last_token_fusion_with_the_answer_prefill_transfers_held_out_facts(tmp_path):
    """100 steps of the README recipe (answer prefill, fuse only the last prompt token): the receiver answers
    held-out facts that only the llama sender knows far above chance, and the mismatched control does not."""
    import lightning as L

    from fedrefine.evaluation import EvaluationConfig
    from fedrefine.fuser import FuserConfig
    from fedrefine.recipes import C2CModule
    from fedrefine.tasks.multiple_choice import ANSWER_PREFIX
    from fedrefine.toyworld.lightning import ToyParticipant, ToyWorldDataModule

    L.seed_everything(0)
    module = C2CModule(
        ToyParticipant("receiver"), ToyParticipant("llama-sender"),
        FuserConfig(hidden_size=128, dropout=0.0, gate_init=2.0, fuse_at="last"), learning_rate=3e-3,
        evaluation=EvaluationConfig(answer_mode="cloze", prefill_answer=True, test_routes=["receiver", "c2c", "c2c_mismatched"]),
        export_dir=str(tmp_path / "fuser"),
    )
    data = ToyWorldDataModule(group=0, include_public=False, data_dir=str(tmp_path / "data"), batch_size=32,
                              response_prefill=ANSWER_PREFIX)
    accuracy, _ = fit_and_test_on_held_out(module, data, tmp_path)
    assert accuracy["receiver"] <= 0.30
    assert accuracy["c2c"] >= accuracy["receiver"] + 0.25, accuracy
    assert abs(accuracy["c2c_mismatched"] - accuracy["receiver"]) <= 0.10, accuracy
