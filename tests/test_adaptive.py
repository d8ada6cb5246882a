"""The adaptive route policy on hand-made profiles: choices, fallback, profile validation, sweep and bar."""

import copy
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedrefine.federation.adaptive import (
    AdaptivePolicy,
    LinkProfile,
    ProfileError,
    default_budgets_s,
    load_profile,
    parse_profile,
    predicted_latency_s,
    profile_to_dict,
    sweep,
)

N = 4  # questions


def option(name, route, dev_accuracy, bytes_, compute_s, correct=None, codec=None, layer_budget=None):
    round_trips = 0 if route == "receiver" else 1
    bytes_ = bytes_ if isinstance(bytes_, list) else [bytes_] * N
    correct = correct if correct is not None else [True] * N
    return {"name": name, "route": route, "codec": codec, "layer_budget": layer_budget,
            "dev_accuracy": dev_accuracy, "correct": correct, "bytes": bytes_, "compute_s": compute_s,
            "round_trips": round_trips}


def profile_dict(options):
    return {
        "format": "fedrefine.adaptive_profile",
        "version": 1,
        "questions": [{"id": f"q{i}", "receiver_tokens": 40, "sender_tokens": {"llama": 50}} for i in range(N)],
        "options": options,
    }


# receiver 10 ms; T2T 0.5 s of generation and a short text; C2C 50 ms of compute and a big (fp32) or small (int4) cache
RECEIVER = option("receiver", "receiver", 0.30, 0, 0.01)
T2T = option("t2t", "t2t", 0.60, 2_000, 0.5)
C2C_FP32 = option("c2c/fp32/all", "c2c", 0.90, 4_000_000, 0.05, codec="fp32")
C2C_INT4 = option("c2c/int4/all", "c2c", 0.85, 500_000, 0.05, codec="int4")
STANDARD = [RECEIVER, T2T, C2C_FP32, C2C_INT4]


def standard_profile(options=STANDARD):
    return parse_profile(profile_dict(copy.deepcopy(options)), "hand-made.json")


def test_predicted_latency_is_compute_plus_round_trips_plus_transfer():
    profile = standard_profile()
    link = LinkProfile(mbit_per_s=10, rtt_s=0.02)
    assert predicted_latency_s(profile.option("c2c/int4/all"), 0, link) == pytest.approx(0.05 + 0.02 + 0.4)
    assert predicted_latency_s(profile.option("receiver"), 0, link) == pytest.approx(0.01)


def test_picks_the_most_accurate_option_that_fits():
    profile = standard_profile()
    link = LinkProfile(mbit_per_s=1000, rtt_s=0.02)
    # fp32: 0.05 + 0.02 + 0.032 = 0.102 s; int4: 0.074 s; t2t: 0.520 s; receiver: 0.01 s
    assert AdaptivePolicy(profile.options, link, budget_s=0.2).choose(0).name == "c2c/fp32/all"
    assert AdaptivePolicy(profile.options, link, budget_s=0.1).choose(0).name == "c2c/int4/all"
    assert AdaptivePolicy(profile.options, link, budget_s=0.05).choose(0).name == "receiver"


@pytest.mark.parametrize(
    "mbit_per_s, expected",
    [(1000, "c2c/fp32/all"), (10, "c2c/int4/all"), (1, "t2t"), (0.01, "receiver")],
)
def test_slower_links_push_it_from_fp32_to_int4_to_t2t_to_the_receiver(mbit_per_s, expected):
    profile = standard_profile()
    policy = AdaptivePolicy(profile.options, LinkProfile(mbit_per_s=mbit_per_s, rtt_s=0.02), budget_s=1.0)
    assert policy.choose(0).name == expected


def test_falls_back_to_the_fastest_option_when_nothing_fits():
    profile = standard_profile()
    link = LinkProfile(mbit_per_s=1, rtt_s=0.02)
    assert AdaptivePolicy(profile.options, link, budget_s=0.001).choose(0).name == "receiver"
    without_receiver = standard_profile([T2T, C2C_FP32, C2C_INT4])
    # t2t: 0.5 + 0.02 + 0.016 s is the fastest left; neither C2C (>= 4 s) fits either
    assert AdaptivePolicy(without_receiver.options, link, budget_s=0.001).choose(0).name == "t2t"


def test_ties_in_dev_accuracy_go_to_fewer_bytes():
    same_accuracy = dict(C2C_INT4, name="c2c/int8/all", codec="int8", dev_accuracy=0.90, bytes=[1_000_000] * N)
    profile = standard_profile([RECEIVER, C2C_FP32, same_accuracy])
    policy = AdaptivePolicy(profile.options, LinkProfile(mbit_per_s=1000, rtt_s=0.02), budget_s=10.0)
    assert policy.choose(0).name == "c2c/int8/all"


def test_a_dev_accuracy_margin_lets_fewer_bytes_win_a_near_tie():
    int8 = dict(C2C_INT4, name="c2c/int8/all", codec="int8", dev_accuracy=0.895, bytes=[1_000_000] * N)
    profile = standard_profile([RECEIVER, C2C_FP32, int8, C2C_INT4])
    link = LinkProfile(mbit_per_s=1000, rtt_s=0.02)
    assert AdaptivePolicy(profile.options, link, budget_s=10.0).choose(0).name == "c2c/fp32/all"
    # 0.90 vs 0.895 is within 1 point: int8 sends a quarter of the bytes; int4 (0.85) is not within it
    assert AdaptivePolicy(profile.options, link, 10.0, dev_accuracy_margin=0.01).choose(0).name == "c2c/int8/all"


def test_chooses_per_question_from_its_bytes():
    long_questions = dict(C2C_FP32, bytes=[400_000, 4_000_000, 400_000, 4_000_000])
    profile = standard_profile([RECEIVER, long_questions, C2C_INT4])
    policy = AdaptivePolicy(profile.options, LinkProfile(mbit_per_s=10, rtt_s=0.02), budget_s=1.0)
    assert [policy.choose(i).name for i in range(N)] == ["c2c/fp32/all", "c2c/int4/all"] * 2


class Untouchable:
    """Stands in for the held-out answers: any read fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the policy read the held-out answers ({name})")

    def __getitem__(self, index):
        raise AssertionError("the policy read the held-out answers")

    def __iter__(self):
        raise AssertionError("the policy read the held-out answers")

    def __len__(self):
        raise AssertionError("the policy read the held-out answers")


def test_the_policy_never_reads_the_held_out_answers():
    profile = standard_profile()
    hidden = [dataclasses.replace(o, correct=Untouchable()) for o in profile.options]
    for mbit_per_s in (0.01, 1, 10, 1000):
        for budget_s in (0.001, 0.1, 1.0, 100.0):
            link = LinkProfile(mbit_per_s=mbit_per_s, rtt_s=0.02)
            choices = [AdaptivePolicy(hidden, link, budget_s).choose(i).name for i in range(N)]
            assert choices == [AdaptivePolicy(profile.options, link, budget_s).choose(i).name for i in range(N)]


# ----------------------------------------------------------------------------- profile files


def write(tmp_path, data):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    return path


def broken(mutate):
    data = profile_dict(copy.deepcopy(STANDARD))
    mutate(data)
    return data


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d.pop("questions"), "questions"),
        (lambda d: d["options"][2].pop("dev_accuracy"), "options[2] (c2c/fp32/all).dev_accuracy"),
        (lambda d: d["questions"][1].pop("receiver_tokens"), "questions[1].receiver_tokens"),
        (lambda d: d["options"][3]["correct"].pop(), "options[3] (c2c/int4/all).correct"),
        (lambda d: d["options"][1]["bytes"].append(7), "options[1] (t2t).bytes"),
        (lambda d: d["options"][1].update(route="c2x"), "options[1] (t2t).route"),
        (lambda d: d.update(format="fedrefine.something_else"), "format"),
        (lambda d: d.update(version=2), "version"),
        (lambda d: d["options"][0].update(dev_accuracy=1.5), "options[0] (receiver).dev_accuracy"),
        (lambda d: d["options"][2]["correct"].__setitem__(0, 1), "options[2] (c2c/fp32/all).correct[0]"),
        (lambda d: d["options"][2].update(layer_budget=0), "options[2] (c2c/fp32/all).layer_budget"),
        (lambda d: d["options"][3].update(name="c2c/fp32/all"), "options[3] (c2c/fp32/all).name"),
        (lambda d: d["options"][0].update(dev_acuracy=0.3), "options[0] (receiver).dev_acuracy"),
        (lambda d: d["options"][1].pop("name"), "options[1].name"),
    ],
)
def test_profile_errors_name_the_file_and_the_field(tmp_path, mutate, field):
    path = write(tmp_path, broken(mutate))
    with pytest.raises(ProfileError) as error:
        load_profile(path)
    message = str(error.value)
    assert message.startswith(f"{path}: {field}:"), message


def test_length_mismatch_says_what_to_do(tmp_path):
    path = write(tmp_path, broken(lambda d: d["options"][3]["correct"].pop()))
    with pytest.raises(ProfileError, match="has 3 entries but questions has 4; give one per question"):
        load_profile(path)


def test_a_missing_or_unparsable_file_is_named(tmp_path):
    with pytest.raises(ProfileError, match="no such profile file"):
        load_profile(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ProfileError, match="bad.json: not valid JSON"):
        load_profile(tmp_path / "bad.json")


def test_a_profile_round_trips_through_its_dict(tmp_path):
    profile = load_profile(write(tmp_path, profile_dict(copy.deepcopy(STANDARD))))
    again = parse_profile(json.loads(json.dumps(profile_to_dict(profile))), "again.json")
    assert again.options == profile.options and again.questions == profile.questions


# ----------------------------------------------------------------------------- sweep and bar


def test_sweep_accuracy_counts_late_answers_and_accuracy_within_budget_does_not():
    fp32 = dict(C2C_FP32, correct=[True, True, True, False])
    profile = standard_profile([dict(RECEIVER, correct=[False] * N), fp32])
    result = sweep(profile, mbit_per_s=[10], rtt_s=0.02, budgets_s=[1.0])  # fp32 takes 3.27 s
    row = next(r for r in result.rows if r.policy == "c2c/fp32/all")
    assert row.accuracy == 0.75 and row.accuracy_within_budget == 0.0 and row.share_within_budget == 0.0
    assert row.mean_bytes == 4_000_000 and row.mean_latency_s == pytest.approx(3.27)
    adaptive = next(r for r in result.rows if r.policy == "adaptive")
    assert adaptive.choices == {"receiver": N} and adaptive.share_within_budget == 1.0


def test_default_budgets_span_only_the_receiver_to_everything():
    profile = standard_profile()
    for mbit_per_s in (1, 10, 100, 1000):
        link = LinkProfile(mbit_per_s=mbit_per_s, rtt_s=0.02)
        budgets = default_budgets_s(profile.options, link)
        assert budgets == sorted(set(budgets))
        fits_first = [o.name for o in profile.options if predicted_latency_s(o, 0, link) <= budgets[0]]
        assert fits_first == ["receiver"]
        assert all(predicted_latency_s(o, i, link) <= budgets[-1] for o in profile.options for i in range(N))


def test_the_bar_holds_when_dev_accuracy_ranks_the_options_as_held_out_does():
    options = [
        dict(RECEIVER, correct=[True, False, False, False]),
        dict(T2T, correct=[True, True, False, False]),
        dict(C2C_FP32, correct=[True, True, True, True]),
        dict(C2C_INT4, correct=[True, True, True, False]),
    ]
    result = sweep(standard_profile(options), rtt_s=0.02)
    assert result.holds and all(v.holds for v in result.verdicts)
    assert [v.mbit_per_s for v in result.verdicts] == [1, 10, 100, 1000]
    everything_fits = result.verdicts[-1].budgets[-1]
    assert everything_fits.best_fixed_meeting_budget == "c2c/fp32/all"
    assert everything_fits.adaptive_accuracy == everything_fits.best_fixed_accuracy == 1.0


def test_the_bar_fails_when_a_fixed_route_beats_the_policy():
    # dev accuracy says fp32 > int4, but on the held-out questions int4 is far better
    options = [
        dict(RECEIVER, correct=[False] * N),
        dict(C2C_FP32, correct=[True, False, False, False]),
        dict(C2C_INT4, correct=[True, True, True, True]),
    ]
    result = sweep(standard_profile(options), mbit_per_s=[1000], rtt_s=0.02, budgets_s=[10.0])
    (verdict,) = result.verdicts[0].budgets
    assert verdict.share_ok and not verdict.accuracy_ok and not result.holds
    assert verdict.best_fixed_meeting_budget == "c2c/int4/all" and verdict.best_fixed_accuracy == 1.0
    assert verdict.adaptive_accuracy == 0.25


def test_the_accuracy_check_is_vacuous_when_no_fixed_route_meets_the_budget():
    # each route is too slow for half of the questions: only a per-question choice keeps every answer in time
    fp32 = dict(C2C_FP32, bytes=[400_000, 4_000_000, 400_000, 4_000_000])
    int4 = dict(C2C_INT4, bytes=[5_000_000, 500_000, 5_000_000, 500_000])
    result = sweep(standard_profile([fp32, int4]), mbit_per_s=[10], rtt_s=0.02, budgets_s=[1.0])
    adaptive = next(r for r in result.rows if r.policy == "adaptive")
    assert adaptive.choices == {"c2c/fp32/all": 2, "c2c/int4/all": 2}
    (verdict,) = result.verdicts[0].budgets
    assert verdict.best_fixed_meeting_budget is None and verdict.accuracy_ok
    assert verdict.adaptive_share == 1.0 > verdict.best_fixed_share == 0.5 and verdict.holds


# ----------------------------------------------------------------------------- the benchmark script

REPO = Path(__file__).resolve().parent.parent


def run_script(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), MPLBACKEND="Agg")
    return subprocess.run([sys.executable, str(REPO / "benchmarks/adaptive.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True)


def test_the_script_runs_on_a_profile_and_labels_a_synthetic_one(tmp_path):
    profile_path = write(tmp_path, profile_dict(copy.deepcopy(STANDARD)))
    done = run_script("--profile", str(profile_path), "--rates", "10", "1000", "--out", str(tmp_path / "out/adaptive"))
    assert done.returncode == 0, done.stderr
    payload = json.loads((tmp_path / "out/adaptive.json").read_text())
    assert payload["profile"]["sha256"] == hashlib.sha256(profile_path.read_bytes()).hexdigest()
    assert payload["profile"]["synthetic"] is False and set(payload["bar"]) == {"10", "1000"}
    assert len(payload["commit"] or "0" * 40) == 40 and (tmp_path / "out/adaptive.png").stat().st_size > 0
    assert "SYNTHETIC" not in (tmp_path / "out/adaptive.md").read_text()

    done = run_script("--synthetic", "--rates", "100", "--out", str(tmp_path / "smoke/adaptive"))
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "smoke/adaptive.json").read_text())["profile"]["synthetic"] is True
    assert "SYNTHETIC PROFILE" in (tmp_path / "smoke/adaptive.md").read_text()


def test_the_script_refuses_synthetic_results_under_benchmarks_results():
    done = run_script("--synthetic", "--out", str(REPO / "benchmarks/results/adaptive"))
    assert done.returncode == 2 and "must not go under" in done.stderr
