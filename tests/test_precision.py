"""The one ``precision`` setting: its vocabulary, what it casts, fusers saved in one dtype loaded into another, senders
and receivers in different dtypes, and the setting reaching every entry point (a tiny model's parameter dtypes)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import LLAMA_SPEC, QWEN2_SPEC, RECEIVER_SPEC
from fedrefine.fuser import Fuser, FuserConfig
from fedrefine.fusion import FusedReceiver
from fedrefine.participants import build_tiny_participant
from fedrefine.participants.precision import (
    PrecisionError,
    cast_for_precision,
    cast_model,
    fuser_dtype,
    load_dtype,
    precision_context,
    resolve_precision,
    weight_dtype,
)
from fedrefine.participants.sources import RandomRealParticipant, TinyParticipant
from fedrefine.recipes.run_dir import prepare_run
from fedrefine.wire import LinkConfig

BF16 = torch.bfloat16
#: Logits of a tiny model in bf16 against fp32: bf16 keeps 8 bits of mantissa (relative 2^-8 per rounding).
BF16_LOGIT_TOLERANCE = 0.1


def dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters()}


def fused_pair(sender_spec=LLAMA_SPEC, seed: int = 0, fuse_at: str = "prompt") -> FusedReceiver:
    """A fresh receiver and sender (never the session's shared ones: these are cast in place) and a fuser whose
    weights write something (an untrained fuser adds nothing)."""
    receiver, sender = build_tiny_participant(RECEIVER_SPEC), build_tiny_participant(sender_spec)
    fuser = Fuser(sender.identity, receiver.identity, FuserConfig(hidden_size=32, num_blocks=2, fuse_at=fuse_at))
    generator = torch.Generator().manual_seed(seed)
    for parameter in fuser.parameters():
        parameter.data.normal_(0.0, 0.3, generator=generator)
    return FusedReceiver(receiver, [sender], [fuser]).eval()


def prompts(model: FusedReceiver, texts=("Which gas do plants take in?", "Name a planet with rings.")):
    encoder = model.encoder
    return encoder.collate([encoder.encode([{"role": "user", "content": t}]) for t in texts])


@torch.no_grad()
def last_logits(model: FusedReceiver, batch, link: LinkConfig | None = None, precision: str = "32-true"):
    with precision_context(precision, "cpu"):
        sent = model.send(batch, link=link)
        assert sent.messages, "the sender sent nothing"
        return model(batch, sent.messages, sent.own).logits[:, -1].float()  # (B, V)


# --- the vocabulary -------------------------------------------------------------------------------
def test_precision_values_dtypes_and_refusals():
    assert resolve_precision(None, "cpu") == "32-true" and resolve_precision("auto", "cpu") == "32-true"
    assert resolve_precision("bf16", "cpu") == "bf16-mixed" and resolve_precision(32) == "32-true"
    table = {p: (weight_dtype(p), fuser_dtype(p)) for p in ("32-true", "bf16-true", "bf16-mixed", "16-true")}
    assert table == {"32-true": (torch.float32,) * 2, "bf16-true": (BF16, BF16), "bf16-mixed": (BF16, torch.float32),
                     "16-true": (torch.float16,) * 2}
    with pytest.raises(PrecisionError, match=r"precision='bf17'.*32-true.*bf16-true"):
        resolve_precision("bf17")
    with pytest.raises(PrecisionError, match="dtype='int8'"):
        load_dtype("int8")
    assert isinstance(precision_context("bf16-mixed", "cpu"), torch.autocast)
    with precision_context("bf16-mixed", "cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == BF16
    with precision_context("bf16-true", "cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_casts_keep_rotary_tables_in_float32():
    participant = build_tiny_participant(RECEIVER_SPEC)
    before = {n: b.clone() for n, b in participant.model.named_buffers() if n.endswith("inv_freq")}
    assert before, "the tiny Qwen3 has rotary tables"
    cast_model(participant.model, BF16)
    assert dtypes(participant.model) == {BF16}
    after = dict(participant.model.named_buffers())
    for name, table in before.items():
        assert after[name].dtype == torch.float32 and torch.equal(after[name], table)


@pytest.mark.parametrize("precision, fusers", [("bf16-true", BF16), ("bf16-mixed", torch.float32), ("32-true", torch.float32)])
def test_cast_for_precision_sets_participants_and_fusers(precision, fusers):
    model = cast_for_precision(fused_pair(), precision)
    assert dtypes(model.receiver.model) == dtypes(model.senders[model.sender_names[0]].model) == {weight_dtype(precision)}
    assert dtypes(model.fusers) == {fusers}


# --- fusers across dtypes ------------------------------------------------------------------------
def test_fp32_trained_fuser_loads_into_bf16_receiver_and_answers_close_to_fp32(tmp_path):
    reference = fused_pair()
    reference.fusers[0].save(tmp_path / "fuser")
    batch = prompts(reference)
    fp32 = last_logits(reference, batch)

    for precision in ("bf16-true", "bf16-mixed"):
        model = fused_pair(seed=99)  # other weights, replaced by the saved ones
        receiver, sender = model.receiver, model.senders[model.sender_names[0]]
        loaded = Fuser.load(tmp_path / "fuser", sender.identity, receiver.identity)
        model = cast_for_precision(FusedReceiver(receiver, [sender], [loaded]).eval(), precision)
        assert dtypes(model.fusers) == {fuser_dtype(precision)}
        logits = last_logits(model, batch, precision=precision)
        assert torch.isfinite(logits).all()
        assert (logits - fp32).abs().max() < BF16_LOGIT_TOLERANCE, precision
        assert torch.equal(logits.argmax(-1), fp32.argmax(-1))
    other = last_logits(fused_pair(seed=5), batch)  # another fuser moves the logits far more than bf16 does
    assert (other - fp32).abs().max() > 2 * BF16_LOGIT_TOLERANCE


def test_bf16_saved_fuser_loads_into_fp32_exactly_upcast(tmp_path):
    model = fused_pair()
    fuser = model.fusers[0]
    fuser.to(BF16).save(tmp_path / "fuser")
    loaded = Fuser.load(tmp_path / "fuser", fuser.sender, fuser.receiver)
    assert dtypes(loaded) == {torch.float32}
    for (name, mine), (_, theirs) in zip(fuser.named_parameters(), loaded.named_parameters()):
        assert torch.equal(mine.float(), theirs), name


# --- senders and receivers in different dtypes ---------------------------------------------------
@pytest.mark.parametrize("codec", [None, "fp32", "bf16", "int8"])
@pytest.mark.parametrize("sender_dtype, receiver_precision", [(BF16, "32-true"), (torch.float32, "bf16-true")])
def test_sender_and_receiver_in_other_dtypes_are_converted(codec, sender_dtype, receiver_precision):
    """A bf16 sender's cache read by an fp32 receiver (and an fp32 sender's by a bf16 receiver), in process or over
    a link's codec: converted to the fuser's dtype, finite, close to the all-fp32 answer."""
    reference = fused_pair(QWEN2_SPEC)
    batch = prompts(reference)
    link = None if codec is None else LinkConfig(codec=codec)
    fp32 = last_logits(reference, batch, link)
    model = cast_for_precision(fused_pair(QWEN2_SPEC), receiver_precision)
    cast_model(model.senders[model.sender_names[0]].model, sender_dtype)
    sent = model.send(batch, link=link)
    assert {t.dtype for kv in sent.messages[model.sender_names[0]].layers.values() for t in kv} == {sender_dtype}
    logits = last_logits(model, batch, link)
    assert torch.isfinite(logits).all()
    assert (logits - fp32).abs().max() < BF16_LOGIT_TOLERANCE * (3 if codec == "int8" else 1)


# --- the setting reaches every entry point -------------------------------------------------------
def test_trainer_precision_sets_every_auto_participant_dtype():
    sources = {"class_path": "fedrefine.participants.sources.TinyParticipant", "init_args": {"dtype": "auto"}}
    config = {"trainer": {"precision": "bf16-mixed"},
              "model": {"class_path": "fedrefine.recipes.C2CModule", "init_args": {
                  "receiver": dict(sources, init_args={"dtype": "auto"}),
                  "sender": {"class_path": "fedrefine.toyworld.lightning.ToyParticipant", "init_args": {"dtype": "auto"}},
                  "extra": {"class_path": "x.RandomRealParticipant", "init_args": {"dtype": "float32"}}}}}
    prepare_run(config, "test")
    init = config["model"]["init_args"]
    assert init["receiver"]["init_args"]["dtype"] == init["sender"]["init_args"]["dtype"] == "bfloat16"
    assert init["extra"]["init_args"]["dtype"] == "float32"  # spelled out: kept
    assert dtypes(TinyParticipant(RECEIVER_SPEC, dtype="bfloat16").load().model) == {BF16}
    assert dtypes(TinyParticipant(RECEIVER_SPEC).load().model) == {torch.float32}  # auto on CPU
    random = RandomRealParticipant("Qwen/Qwen3-0.6B", num_hidden_layers=1, dtype="bfloat16").load()
    assert dtypes(random.model) == {BF16}


def tiny_run_args(root) -> list[str]:
    return ["--config", "configs/tiny.yaml", "--trainer.default_root_dir", str(root), "--trainer.logger", "false",
            "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false", "--overwrite", "true"]


def test_fedrefine_test_runs_an_fp32_trained_fuser_at_each_precision(tmp_path):
    """``fedrefine test --trainer.precision P``: participants and fusers in P's dtypes (Lightning casts for
    ``bf16-true``; ``dtype: auto`` participants load in bf16 for ``bf16-mixed``), every question answered."""
    from fedrefine.recipes.trainer_cli import build_cli

    fuser = tmp_path / "fuser"
    build_cli(["fit", *tiny_run_args(tmp_path / "fit"), "--trainer.max_steps", "2", "--model.export_dir", str(fuser)])
    assert Fuser.read_metadata(fuser)["trained_with"]["precision"] == "32-true"
    for precision in ("bf16-true", "bf16-mixed"):
        root = tmp_path / precision
        with pytest.warns(UserWarning, match=r"other participant dtypes: sender bfloat16 \(trained: float32\)"):
            cli = build_cli(["test", *tiny_run_args(root), "--trainer.precision", precision, "--model.fuser_path",
                             str(fuser)])
        fused = cli.model.fused
        assert (precision, dtypes(fused.receiver.model), dtypes(fused.sender_models)) == (precision, {BF16}, {BF16})
        assert dtypes(fused.fusers) == {fuser_dtype(precision)}
        assert {b.dtype for n, b in fused.receiver.model.named_buffers() if n.endswith("inv_freq")} == {torch.float32}
        results = json.loads((root / "test_results.json").read_text())
        assert not results["failures"] and not results.get("route_failures"), results
        assert all(row["questions"] == 12 and row["failed"] == 0 for row in results["rows"]), results["rows"]


TINY_CONFIG = """
seed_everything: 0
trainer: {precision: bf16-true}
model:
  class_path: fedrefine.recipes.C2CModule
  init_args:
    receiver:
      class_path: fedrefine.participants.sources.TinyParticipant
      init_args: {spec: {name: qwen3-receiver, architecture: qwen3, num_layers: 3, hidden_size: 64, num_heads: 4,
                         num_kv_heads: 2, head_dim: 16}}
    sender:
      class_path: fedrefine.participants.sources.TinyParticipant
      init_args: {spec: {name: llama-sender, architecture: llama, num_layers: 2, hidden_size: 48, num_heads: 6,
                         num_kv_heads: 3, head_dim: 8, rope_theta: 500000.0, tokenizer_kind: metaspace_bpe,
                         chat_style: llama3, seed: 1}}
    fuser: {hidden_size: 16, num_blocks: 2}
"""


def test_lm_eval_adapter_takes_the_configs_precision_or_its_own(tmp_path):
    pytest.importorskip("lm_eval")
    from types import SimpleNamespace

    from fedrefine.harness.model import FedRefineLM

    config = tmp_path / "c2c.yaml"
    config.write_text(TINY_CONFIG)
    totals = {}
    for given, fusers in ((None, BF16), ("bf16-mixed", torch.float32), ("32-true", torch.float32)):
        lm = FedRefineLM(config=str(config), route="c2c", precision=given)
        context = lm.apply_chat_template([{"role": "user", "content": "Which gas do plants take in?"}])
        asked = [SimpleNamespace(args=(context, " carbon dioxide"))]
        assert lm.precision == given or (given is None and lm.precision == "bf16-true")  # the config's trainer.precision
        assert dtypes(lm.fused.receiver.model) == {weight_dtype(lm.precision)} and dtypes(lm.fused.fusers) == {fusers}
        totals[lm.precision] = lm.loglikelihood(asked, disable_tqdm=True)[0][0]
    assert all(torch.isfinite(torch.tensor(t)) for t in totals.values())
    assert abs(totals["bf16-true"] - totals["32-true"]) < 0.5 and abs(totals["bf16-mixed"] - totals["32-true"]) < 0.5
    with pytest.raises(PrecisionError, match="precision='fp8'"):
        FedRefineLM(config=str(config), precision="fp8")


def test_python_api_loads_in_the_precision_asked_for():
    import fedrefine

    for precision, fusers in (("bf16-true", BF16), ("bf16-mixed", torch.float32), (None, torch.float32)):
        pair = fedrefine.load(receiver=TinyParticipant(RECEIVER_SPEC), sender=TinyParticipant(LLAMA_SPEC),
                              precision=precision, device="cpu")
        assert pair.precision == (precision or "32-true")  # None: by the device (CPU)
        fused = pair.module.fused
        assert dtypes(fused.receiver.model) == dtypes(fused.sender_models) == {weight_dtype(pair.precision)}
        assert dtypes(fused.fusers) == {fusers}
        answer = pair.answer("Which gas do plants take in?", ["oxygen", "carbon dioxide"], route="c2c")
        assert answer.failure is None and answer.prediction in ("A", "B")


def test_bench_sweeps_take_precision_and_keep_it_apart_in_their_results(tmp_path):
    from fedrefine.bench.results_file import settings_fingerprint
    from fedrefine.bench.runner import BenchSweep
    from fedrefine.cli import load_sweep
    from fedrefine.evaluation import EvaluationConfig
    from fedrefine.toyworld.lightning import ToyWorldDataModule

    sweep, _ = load_sweep(["--config", "benchmarks/fig3_toy.yaml", "--precision", "bf16-mixed"])
    assert sweep.precision == "bf16-mixed"
    sweep = BenchSweep({"receiver": TinyParticipant(RECEIVER_SPEC), "llama": TinyParticipant(LLAMA_SPEC)}, "receiver",
                       ["llama"], ToyWorldDataModule(data_dir=str(tmp_path)), routes=["t2t"], precision="bf16-true")
    model = sweep.model(None)
    assert dtypes(model.receiver.model) == dtypes(model.fusers) == {BF16}
    assert sweep.header(None, "x")["precision"] == "bf16-true"
    identity = {"receiver": model.receiver.identity}
    fp32 = settings_fingerprint(identity, [], EvaluationConfig(), 4, 100.0)
    assert "precision" not in fp32.parts  # fp32 results from before the setting keep their fingerprint
    assert settings_fingerprint(identity, [], EvaluationConfig(), 4, 100.0, "bf16-true") != fp32


def test_a_bf16_served_sender_feeds_an_fp32_receiver_over_grpc():
    """``fedrefine serve participant --precision bf16-true``: the served model is bf16; its K/V reach an fp32 receiver
    (the fp32 wire codec its local view asks for) and are converted, close to the all-fp32 answer."""
    from fedrefine.runtime.participant_client import CallSettings, ParticipantClient
    from fedrefine.runtime.participant_server import config_parser, load_served, serve_participant

    args = config_parser().parse_args(["--config", "configs/serve/toy_llama.yaml", "--precision", "bf16-true"])
    assert args.precision == "bf16-true"

    class Unloadable(TinyParticipant):
        def load(self):
            raise AssertionError("a wrong precision is refused before anything loads")

    with pytest.raises(PrecisionError, match="precision='bf15'"):
        load_served(Unloadable(LLAMA_SPEC), "bf15")
    served = load_served(TinyParticipant(LLAMA_SPEC), "bf16-true")
    assert dtypes(served.model) == {BF16}
    reference = fused_pair(fuse_at="prompt")
    batch = prompts(reference)
    fp32 = last_logits(reference, batch)
    server, port = serve_participant(served)
    server.start()
    try:
        name = reference.sender_names[0]
        client = ParticipantClient(f"grpc://127.0.0.1:{port}", served.identity, calls=CallSettings(deadline_s=30))
        remote = FusedReceiver(reference.receiver, [reference.senders[name]], list(reference.fusers),
                               remotes={name: client}).eval()
        logits = last_logits(remote, batch)
    finally:
        server.stop(None).wait(5)
    assert torch.isfinite(logits).all() and (logits - fp32).abs().max() < BF16_LOGIT_TOLERANCE
    assert (logits - fp32).abs().max() > 0  # it really was the bf16 sender that answered
