"""Rephrased queries: plans, mode checks, the rephrasing cache, seeded sampling, the privacy invariant, leakage."""

import dataclasses
import json
import re

import pytest
import torch

from fedrefine.participants.chat import encode_chat
from fedrefine.participants.padding import left_pad
from fedrefine.privacy.leakage import (
    InputRecorder,
    content_words,
    find_leaks,
    leakage_report,
    local_sentence_embedder,
    token_overlap,
)
from fedrefine.privacy.plans import plan_queries
from fedrefine.privacy.rephrase import RephraseConfig, Rephraser, Rephrasing
from fedrefine.tasks.multiple_choice import MultipleChoiceItem, question_text
from fedrefine.tasks.routes import Route, RouteError
from fedrefine.tasks.t2t import DEFAULT_PROMPT_TEMPLATE, T2TConfig, t2t_predict
from fedrefine.wire.message import prefill_message

ITEMS = [
    MultipleChoiceItem(
        "p1", "Zorblax told Quenford the glimmerstone heats quickly; which material conducts heat best?",
        ("a metal spoon", "a wooden stick", "a cloth", "a glass"), tuple("ABCD"), "A",
    ),
    MultipleChoiceItem(
        "p2", "Varnethia counted 4817 pebbles near Ostrowick lake; what does a fox eat?",
        ("grass", "mice", "rocks", "water"), tuple("ABCD"), "B",
    ),
]
DISTINCTIVE = {"zorblax", "quenford", "glimmerstone", "varnethia", "4817", "ostrowick"}
FAST = RephraseConfig(max_new_tokens=8)


@pytest.fixture
def local(chatty_receiver):
    """The user's own model: receiver and rephraser."""
    return chatty_receiver


@pytest.fixture
def senders(llama_chatty, qwen2_chatty):
    return [llama_chatty, qwen2_chatty]


class ScriptedRephraser(Rephraser):
    """Rephrases by a fixed rule, without a model: for exact plan checks."""

    def __init__(self, participant, rule):
        super().__init__(participant)
        self.rule = rule

    def rephrase(self, queries, variant=None):
        return [Rephrasing(q, self.rule(q, variant), variant, None, 3, 0.5) for q in queries]


def count_forwards(participant):
    calls = []
    handle = participant.model.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


# --- mode checks ------------------------------------------------------------------------------


def check_mode(mode, route, options="verbatim", fusion=None):
    Route.parse(f"{route}@{mode}" if mode != "original" else route).check(options, fusion)


@pytest.mark.parametrize("route, fusion", [("c2c", "residual"), ("c2c", None), ("c2c.residual", None),
                                           ("c2c.residual:a+b", "residual")])
def test_private_mode_rejects_residual_fusion(route, fusion):
    with pytest.raises(RouteError, match=re.escape(f"'private' cannot run route '{route}@private'") + ".*'c2c.concat' or 't2t'"):
        check_mode("private", route, fusion=fusion)


@pytest.mark.parametrize("route", ["c2c", "c2c.residual", "c2c.residual:a+b"])
def test_last_token_residual_fusion_runs_in_private_mode(route):
    """Fusers that write only the last prompt token align only the shared answer prefix: each sender may read its
    own rephrasing, options included."""
    for options in ("verbatim", "withhold", "rephrase"):
        Route.parse(f"{route}@private").check(options, "residual", aligned="last")


def test_the_routes_a_refusal_suggests_run_in_private_mode():
    for suggested in ("c2c.concat", "t2t"):
        check_mode("private", suggested, options="verbatim")


def test_mode_checks():
    for mode in ("original", "shared", "private"):
        for route in ("t2t", "c2c.concat", "receiver"):
            check_mode(mode, route)
        check_mode(mode, "c2c", fusion="concat")
    check_mode("original", "c2c")
    check_mode("shared", "c2c")
    with pytest.raises(RouteError, match="'withhold' with route 'c2c@shared'.*verbatim"):
        check_mode("shared", "c2c", options="withhold")
    with pytest.raises(RouteError, match="unknown query mode 'secret'"):
        check_mode("secret", "t2t")
    with pytest.raises(RouteError, match="unknown kind 'telepathy'"):
        check_mode("original", "telepathy")
    with pytest.raises(RouteError, match="Unknown options policy"):
        check_mode("original", "t2t", options="hide")


# --- plans ------------------------------------------------------------------------------------


def test_plans_say_who_reads_what(local):
    rephraser = ScriptedRephraser(local, lambda q, variant: f"reworded for {variant} ({len(q)} chars)")
    names = ["tiny:s1", "tiny:s2"]
    item = ITEMS[0]

    (original,) = plan_queries([item], names, "original", options="verbatim")
    assert original.reads == {name: question_text(item) for name in ["receiver", *names]}
    (withheld,) = plan_queries([item], names, "original", options="withhold")
    assert withheld.sender_texts == {n: item.question_stem for n in names}

    (shared,) = plan_queries([item], names, "shared", rephraser, options="verbatim")
    text = f"reworded for None ({len(item.question_stem)} chars)"
    assert shared.receiver == local.name
    assert shared.receiver_item == dataclasses.replace(item, question_stem=text)
    assert shared.sender_texts == {n: question_text(shared.receiver_item) for n in names}  # same text as receiver
    assert {r.text for r in shared.rephrasings.values()} == {text} and set(shared.rephrasings) == {local.name, *names}

    (private,) = plan_queries([item], names, "private", rephraser, options="withhold")
    assert private.receiver_item == item  # the receiver keeps the original
    assert private.sender_texts == {n: f"reworded for {n} ({len(item.question_stem)} chars)" for n in names}
    assert private.sender_messages("tiny:s1") == [{"role": "user", "content": private.sender_texts["tiny:s1"]}]

    (together,) = plan_queries([item], names, "private", rephraser, options="rephrase")
    source_length = len(item.question_stem) + 1 + len("A. a metal spoon\nB. a wooden stick\nC. a cloth\nD. a glass")
    assert together.sender_texts["tiny:s1"] == f"reworded for tiny:s1 ({source_length} chars)"


def test_plans_refuse_leaky_setups(local):
    with pytest.raises(ValueError, match="needs a rephraser"):
        plan_queries(ITEMS, ["tiny:s1"], "shared")
    with pytest.raises(ValueError, match="is also a sender"):
        plan_queries(ITEMS, [local.name], "private", Rephraser(local, FAST))
    (empty,) = plan_queries(ITEMS[:1], ["tiny:s1"], "private", ScriptedRephraser(local, lambda q, v: ""), "withhold")
    assert empty.sender_texts == {"tiny:s1": ""}  # a failed rephrasing is never replaced by the original


# --- rephrasing: cache and determinism ---------------------------------------------------------


def test_a_torn_last_cache_line_is_dropped_and_cut_while_damage_elsewhere_names_the_line(tmp_path):
    from fedrefine.privacy.rephrase import RephrasingCache

    cache = RephrasingCache(tmp_path)
    cache.put({"key": "a", "rephrasing": "one"})
    cache.put({"key": "b", "rephrasing": "two"})
    path = tmp_path / "rephrasings.jsonl"
    path.write_text(path.read_text() + '{"key": "c", "rephr')  # killed mid-write
    with pytest.warns(UserWarning, match="dropped a torn last line 3"):
        reopened = RephrasingCache(tmp_path)
    assert set(reopened.records) == {"a", "b"}
    reopened.put({"key": "c", "rephrasing": "three"})
    assert set(RephrasingCache(tmp_path).records) == {"a", "b", "c"}  # the append started on a fresh line
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"rephrasings.jsonl line 2 is not a rephrasing record"):
        RephrasingCache(tmp_path)


def test_cached_rephrasings_do_not_run_the_model(local, tmp_path):
    queries = [item.question_stem for item in ITEMS]
    calls, handle = count_forwards(local)
    try:
        first = Rephraser(local, FAST, cache_dir=tmp_path).rephrase(queries)
        assert calls and not any(r.cached for r in first)
        records = [json.loads(line) for line in (tmp_path / "rephrasings.jsonl").read_text().splitlines()]
        assert [r["query"] for r in records] == queries
        assert all(r["model"] == local.identity.key and r["template"] == FAST.template for r in records)

        calls.clear()
        again = Rephraser(local, FAST, cache_dir=tmp_path)  # a new process would read the same file
        second = again.rephrase(queries)
        greedy_variant = again.rephrase(queries, variant="tiny:s1")  # greedy: variants share the text
        assert calls == []
        assert [r.text for r in second] == [r.text for r in first] == [r.text for r in greedy_variant]
        assert all(r.cached for r in second)

        other_template = RephraseConfig(template="Say it otherwise: {query}", max_new_tokens=8)
        Rephraser(local, other_template, cache_dir=tmp_path).rephrase(queries[:1])
        assert calls  # the template is part of the key
    finally:
        handle.remove()


def test_seeded_sampling_is_reproducible(local):
    sampled = RephraseConfig(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=1.0, seed=7)
    queries = [ITEMS[0].question_stem]
    first = Rephraser(local, sampled).rephrase(queries, variant="tiny:s1")
    second = Rephraser(local, sampled).rephrase(queries, variant="tiny:s1")
    assert first[0].text == second[0].text and first[0].seed == second[0].seed
    distinct = {Rephraser(local, sampled).rephrase(queries, variant=f"tiny:s{i}")[0].text for i in range(3)}
    assert len(distinct) == 3  # one rephrasing per participant
    reseeded = Rephraser(local, dataclasses.replace(sampled, seed=8)).rephrase(queries, variant="tiny:s1")
    assert reseeded[0].text != first[0].text


# --- faithfulness: invented names and retries ---------------------------------------------------


def test_a_rephrasing_may_drop_the_querys_names_but_not_invent_one():
    from fedrefine.privacy.faithfulness import invented_names, is_faithful, names_in

    query = "I am Daishaik Laidaikrar, from Maire, and I have asthma. In which city does Babrai live?"
    assert names_in("Where does Bapai live? Tell me. I think Paris: London") == ["Bapai", "Paris"]  # sentence starts, "I"
    assert invented_names(query, "Where does Bapai live?") == ["Bapai"]  # a garbled copy
    assert invented_names(query, "Where does Babrai live?") == []  # the preamble's names are meant to be left out
    assert invented_names("Where is the sun?", "Where is the Sun?") == []  # case aside
    assert is_faithful("off", query, "Where does Bapai live?") and not is_faithful("names", query, "Where does Bapai live?")
    with pytest.raises(ValueError, match="rephrase.check must be one of"):
        RephraseConfig(check="spelling")
    with pytest.raises(ValueError, match="rephrase.candidates must be at least 1"):
        RephraseConfig(candidates=0)


def scripted_generation(monkeypatch, first, candidates):
    """Replace the rephraser's generation: ``first`` maps a query to its first reply, ``candidates`` to its retries."""
    from fedrefine.participants.generation import Reply
    from fedrefine.privacy import rephrase

    def query_of(prompt):
        return prompt.rsplit("\n\n", 1)[-1]

    retried = []
    monkeypatch.setattr(rephrase, "generate_replies", lambda participant, prompts, **kw: [
        Reply(first[query_of(p)], (1, 2), 0.25) for p in prompts])

    def beams(participant, prompts, num_candidates, **kw):
        retried.extend(query_of(p) for p in prompts)
        return [[Reply(text, (1,), 1.0) for text in candidates[query_of(p)][:num_candidates]] for p in prompts]

    monkeypatch.setattr(rephrase, "generate_candidates", beams)
    return retried


def test_an_unfaithful_rephrasing_is_retried_and_the_first_passing_candidate_kept(local, tmp_path, monkeypatch):
    queries = ["In which city does Babrai live?", "What does Kroux eat?", "Which colour does Shelirox like?"]
    first = {queries[0]: "Where does Bapai live?", queries[1]: "Which food does Kroux like?",
             queries[2]: "Which colour does Sheli Naix like?"}
    candidates = {queries[0]: ["Where does Babai live?", "Where does Babrai live?", "Where does Babrai stay?"],
                  queries[2]: ["Which colour does Sheli Rox like?", "Which colour does Shelix like?"]}
    retried = scripted_generation(monkeypatch, first, candidates)
    found = Rephraser(local, RephraseConfig(candidates=3), cache_dir=tmp_path).rephrase(queries)
    assert retried == [queries[0], queries[2]]  # the faithful one is not retried
    assert [(r.text, r.candidate, r.faithful) for r in found] == [
        ("Where does Babrai live?", 2, True),  # the first candidate that keeps the name
        ("Which food does Kroux like?", 0, True),
        ("Which colour does Sheli Naix like?", 0, False),  # none passes: the first reply, marked
    ]
    assert [r.seconds for r in found] == [1.25, 0.25, 1.25]  # the retry's time counts
    records = [json.loads(line) for line in (tmp_path / "rephrasings.jsonl").read_text().splitlines()]
    assert [(r["faithful"], r["candidate"]) for r in records] == [(True, 2), (True, 0), (False, 0)]
    again = Rephraser(local, RephraseConfig(candidates=3), cache_dir=tmp_path).rephrase(queries)
    assert [(r.text, r.candidate, r.faithful, r.cached) for r in again] == [(r.text, r.candidate, r.faithful, True) for r in found]

    retried.clear()
    unchecked = Rephraser(local, RephraseConfig(candidates=1)).rephrase(queries)  # no retry: marked only
    assert retried == [] and [r.faithful for r in unchecked] == [False, True, False]
    off = Rephraser(local, RephraseConfig(check="off")).rephrase(queries)
    assert retried == [] and all(r.faithful for r in off) and off[0].text == "Where does Bapai live?"


def test_beam_candidates_come_best_first_and_do_not_depend_on_the_batch(local):
    from fedrefine.participants.generation import generate_candidates

    prompts = [ITEMS[0].question_stem, "Say something short."]
    together = generate_candidates(local, prompts, 3, max_new_tokens=6)
    alone = generate_candidates(local, prompts[1:], 3, max_new_tokens=6)
    assert [len(c) for c in together] == [3, 3]
    assert [c.token_ids for c in together[1]] == [c.token_ids for c in alone[0]]  # left padding changes nothing
    assert all(len(c.token_ids) <= 6 for c in together[0])


# --- the privacy invariant --------------------------------------------------------------------


def what_senders_received(local, senders, mode, route):
    """Run one route under ``mode`` with every sender recorded.

    Returns the plans, each sender's whole received text, and its token-id channel alone (decoded).
    """
    options = "withhold" if route == "t2t" else "verbatim"
    plans = plan_queries(ITEMS, [s.name for s in senders], mode, Rephraser(local, FAST), options)
    recorders = [InputRecorder(s) for s in senders]
    for recorder in recorders:
        recorder.__enter__()
    try:
        recorded = [r.participant for r in recorders]
        if route == "t2t":
            questions = {s.name: [p.sender_texts[s.name] for p in plans] for s in senders}
            t2t_predict(local, recorded, [p.receiver_item for p in plans], T2TConfig(budget=4), questions)
        else:  # concat fusion: each sender prefills its own text
            for sender in recorded:
                rows = [encode_chat(sender, p.sender_messages(sender.name)).input_ids for p in plans]
                ids, mask = left_pad(rows, sender.tokenizer.pad_token_id)
                prefill_message(sender, ids, mask)
    finally:
        for recorder in recorders:
            recorder.__exit__(None, None, None)
    for recorder in recorders:  # the recording is not vacuous
        assert recorder.input_ids and recorder.texts and recorder.opaque_calls == 0
    received = {s.name: r.received_text() for s, r in zip(senders, recorders)}
    return plans, received, {s.name: "\n".join(r.decoded()) for s, r in zip(senders, recorders)}


def leaks(plans, received):
    """Content words of the user's stems that reached a sender without being part of what it may read."""
    original = " ".join(p.item.question_stem for p in plans)
    found = {}
    for sender, text in received.items():
        # what may reach a sender: the prompt's own words, its rephrasing, the options when sent verbatim
        allowed = [DEFAULT_PROMPT_TEMPLATE]
        allowed += [p.rephrasings[sender].text for p in plans if sender in p.rephrasings]
        allowed += [" ".join(p.item.choices) for p in plans if p.options == "verbatim"]
        found[sender] = find_leaks(original, text, " ".join(allowed))
    return found


@pytest.mark.parametrize("route", ["t2t", "c2c.concat"])
@pytest.mark.parametrize("mode", ["shared", "private"])
def test_nothing_but_the_rephrasing_reaches_senders(local, senders, mode, route):
    check_mode(mode, route)
    plans, received, _ = what_senders_received(local, senders, mode, route)
    assert all(r.text for p in plans for r in p.rephrasings.values())  # not vacuous: rephrasings have text
    assert leaks(plans, received) == {s.name: [] for s in senders}
    for text in received.values():
        assert not DISTINCTIVE & content_words(text)


@pytest.mark.parametrize("route", ["t2t", "c2c.concat"])
def test_the_invariant_check_catches_a_leak(local, senders, route):
    plans, received, token_channel = what_senders_received(local, senders, "original", route)
    for sender, words in leaks(plans, received).items():
        assert DISTINCTIVE <= set(words), sender
    for text in received.values():
        assert DISTINCTIVE <= content_words(text)
    # the forward hook alone sees the leak too (byte-level tokenizer: decoding its ids is lossless;
    # the tiny Llama tokenizer has no byte fallback, so its unknown characters show only in the texts)
    assert DISTINCTIVE <= content_words(token_channel[senders[1].name])


# --- leakage figures --------------------------------------------------------------------------


def test_content_words_and_overlap():
    assert content_words("The Fox, the dog and 42 cats!") == {"fox", "dog", "42", "cats"}
    assert token_overlap("The fox eats mice and grass", "a FOX eats") == pytest.approx(2 / 4)
    assert token_overlap("the and of", "anything") == 0.0
    assert find_leaks("Zorblax eats mice", "zorblax mice cheese", allowed="mice") == ["zorblax"]


def test_leakage_report(local, tmp_path):
    names = ["tiny:s1", "tiny:s2"]
    plain = plan_queries(ITEMS, names, "original", options="withhold")
    records, summary = leakage_report(plain)
    assert [(r.question_id, r.sender) for r in records] == [(i.id, n) for i in ITEMS for n in names]
    assert all(r.token_overlap == 1.0 and r.embedding_similarity is None for r in records)
    assert all(r.rephrase_seconds is None and r.cached is None for r in records)
    assert summary.num_records == 4 and summary.mean_rephrase_seconds is None

    rule = lambda q, variant: "A fox eats what?" if "fox" in q else "Which material conducts heat?"  # noqa: E731
    plans = plan_queries(ITEMS, names, "private", ScriptedRephraser(local, rule), options="withhold")

    def letters(texts):  # a stand-in embedder: letter counts
        counts = [torch.bincount(torch.tensor([ord(c) % 32 for c in t.lower()]), minlength=32) for t in texts]
        return torch.stack(counts)

    records, summary = leakage_report(plans, embedder=letters)
    # p1's stem has 10 content words, 3 of them (material, conducts, heat) in the rephrasing;
    # p2's has 9, one of them (fox; "eats" is not "eat").
    assert [r.token_overlap for r in records] == pytest.approx([3 / 10, 3 / 10, 1 / 9, 1 / 9])
    assert summary.mean_token_overlap == pytest.approx((3 / 10 + 1 / 9) / 2)
    assert summary.max_token_overlap == pytest.approx(3 / 10)
    assert all(-1.0 <= r.embedding_similarity <= 1.0 for r in records) and summary.mean_embedding_similarity is not None
    assert summary.mean_rephrase_seconds == pytest.approx(0.5)
    assert local_sentence_embedder(tmp_path / "no-such-model") is None  # never downloads


def test_leakage_report_counts_the_private_preamble_tokens_each_sender_received(local):
    from dataclasses import replace as with_fields

    preamble = "I am Mara Oduya, account 55-3810."
    items = [with_fields(ITEMS[0], question_stem=f"{preamble} {ITEMS[0].question_stem}", private_text=preamble), ITEMS[1]]
    names = ["tiny:s1", "tiny:s2"]
    records, summary = leakage_report(plan_queries(items, names, "original", options="withhold"))
    assert [(r.private_tokens, r.private_tokens_leaked) for r in records] == [(7, 7), (7, 7), (0, 0), (0, 0)]
    assert summary.private_token_leakage == 1.0  # in original mode the senders read the preamble
    rule = lambda q, variant: "Mara asks: which material conducts heat?" if "Mara" in q else "A fox eats what?"  # noqa: E731
    records, summary = leakage_report(plan_queries(items, names, "private", ScriptedRephraser(local, rule), options="withhold"))
    assert [r.private_tokens_leaked for r in records[:2]] == [1, 1]  # "Mara"
    assert summary.private_token_leakage == pytest.approx(2 / 14)
    _, none = leakage_report(plan_queries(ITEMS, names, "original", options="withhold"))
    assert none.private_token_leakage is None  # no question has a private text
