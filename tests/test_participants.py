import pytest
import torch

from fedrefine.kv.cache import returned_cache
from fedrefine.participants import (
    REAL_MODELS,
    ParticipantIdentity,
    ParticipantLoadError,
    build_random_participant,
    load_participant,
    real_model_config,
)


def test_load_from_local_directory_is_frozen_and_identified(receiver, tmp_path):
    receiver.model.save_pretrained(tmp_path)
    receiver.tokenizer.save_pretrained(tmp_path)
    loaded = load_participant(str(tmp_path), dtype="bfloat16", name="tiny/receiver")
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    ident = loaded.identity
    assert ident.name_or_path == "tiny/receiver" and ident.revision.startswith("local-")
    assert ident.architecture == "Qwen3ForCausalLM"
    assert (ident.num_layers, ident.num_kv_heads, ident.head_dim) == (3, 2, 16)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        expected = receiver.model(ids).logits
        got = loaded.model(ids).logits.float()
    assert torch.allclose(expected, got, atol=0.1)  # bf16 copy of the same weights


def test_a_local_model_is_known_by_its_files_not_by_the_path_string(receiver, llama_sender, tmp_path, monkeypatch):
    from fedrefine.fuser import Fuser, FuserPairMismatchError

    model_dir = tmp_path / "models" / "my-receiver"
    receiver.model.save_pretrained(model_dir)
    receiver.tokenizer.save_pretrained(model_dir)
    monkeypatch.chdir(tmp_path)
    by_relative = load_participant("models/my-receiver").identity
    assert load_participant(str(model_dir) + "/").identity == by_relative == load_participant("./models/../models/my-receiver").identity
    assert by_relative.name_or_path == "my-receiver" and by_relative.revision.startswith("local-")
    Fuser(llama_sender.identity, by_relative).save(tmp_path / "fuser")

    moved = tmp_path / "elsewhere" / "copy"  # the same files under another directory name: `name:` keeps the identity
    moved.parent.mkdir()
    model_dir.rename(moved)
    with pytest.raises(FuserPairMismatchError, match=r"Same model at another path\? set `name:`.*`name: my-receiver`"):
        Fuser.load(tmp_path / "fuser", llama_sender.identity, load_participant(str(moved)).identity)
    assert load_participant(str(moved), name="my-receiver").identity == by_relative

    llama_sender.model.save_pretrained(model_dir)  # another model at the first path
    llama_sender.tokenizer.save_pretrained(model_dir)
    other = load_participant("models/my-receiver").identity
    assert other.name_or_path == "my-receiver" and other.revision != by_relative.revision
    with pytest.raises(FuserPairMismatchError, match="another model"):
        Fuser.load(tmp_path / "fuser", llama_sender.identity, other)


def test_unreachable_hub_id_fails_fast_and_names_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ParticipantLoadError, match="local directory") as err:
        load_participant("nobody-here/definitely-not-a-model")
    assert "nobody-here/definitely-not-a-model" in str(err.value)


def test_unknown_dtype_is_a_clear_error(receiver, tmp_path):
    receiver.model.save_pretrained(tmp_path)
    receiver.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Unknown dtype 'fp99'"):
        load_participant(str(tmp_path), dtype="fp99")


@pytest.mark.parametrize(
    "hub_id, layers, kv_heads, head_dim",
    [
        ("Qwen/Qwen3-0.6B", 28, 8, 128),
        ("Qwen/Qwen2.5-0.5B-Instruct", 24, 2, 64),
        ("Qwen/Qwen2.5-Coder-0.5B-Instruct", 24, 2, 64),
        ("Qwen/Qwen2.5-1.5B-Instruct", 28, 2, 128),
        ("meta-llama/Llama-3.2-1B-Instruct", 16, 8, 64),
    ],
)
def test_shipped_real_configs_have_the_real_shapes(hub_id, layers, kv_heads, head_dim):
    ident = ParticipantIdentity.from_config(real_model_config(hub_id), hub_id, "main")
    assert (ident.num_layers, ident.num_kv_heads, ident.head_dim) == (layers, kv_heads, head_dim)


def test_all_case_study_models_are_shipped():
    assert len(REAL_MODELS) == 5


@pytest.mark.parametrize("hub_id", ["Qwen/Qwen2.5-0.5B-Instruct", "meta-llama/Llama-3.2-1B-Instruct"])
def test_random_participant_with_real_shape_runs(hub_id):
    # Two layers and a small local vocabulary keep it light; heads and head dims are the real ones.
    participant = build_random_participant(hub_id, num_hidden_layers=2)
    ident = participant.identity
    assert ident.num_layers == 2 and ident.revision == "random-0"
    with torch.no_grad():
        out = participant.model(torch.tensor([[1, 2, 3, 4]]), use_cache=True)
    keys = returned_cache(out).layers[0].keys
    assert keys.shape == (1, ident.num_kv_heads, 4, ident.head_dim)


@pytest.mark.parametrize("name", ["receiver", "qwen2_sender", "llama_sender"])
def test_a_saved_custom_tokenizer_loads_back_unchanged(request, name, tmp_path):
    """transformers picks a tokenizer class by model type (Qwen2Tokenizer for qwen2), which would
    rebuild the pipeline; a custom tokenizer must come back exactly as saved."""
    participant = request.getfixturevalue(name)
    participant.model.save_pretrained(tmp_path)
    participant.tokenizer.save_pretrained(tmp_path)
    loaded = load_participant(str(tmp_path))
    text = "Café 東京 quick fox?\nThe correct answer is B."
    assert loaded.tokenizer(text)["input_ids"] == participant.tokenizer(text)["input_ids"]


def test_a_local_directory_without_tokenizer_files_is_refused_naming_them(receiver, tmp_path):
    receiver.model.save_pretrained(tmp_path)  # weights and config, no tokenizer
    with pytest.raises(ParticipantLoadError, match=rf"{tmp_path} lacks tokenizer files \(tokenizer.json, or "):
        load_participant(str(tmp_path))


def test_an_empty_or_missing_directory_says_which_file_is_missing(tmp_path):
    with pytest.raises(ParticipantLoadError, match=rf"{tmp_path} has no config.json \(it holds nothing\)"):
        load_participant(str(tmp_path))
    with pytest.raises(ParticipantLoadError, match="does not exist"):
        load_participant(str(tmp_path / "absent"))


def test_an_unknown_hub_id_offline_fails_at_once_with_the_hf_download_command(monkeypatch):
    from fedrefine.bench.kv_bytes import identity_of

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ParticipantLoadError, match=r"`hf download foo/bar --local-dir <DIR>`"):
        identity_of("foo/bar")
