import json

import pytest
import torch

from aigc.artifacts.registry import weights_loader
from aigc.artifacts.run import Weights, read_run_config
from aigc.errors import AigcError
from aigc.models import load_run


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_run_round_trip_gives_same_logits(make_run, kind):
    run_dir = make_run(kind=kind)
    run_a = load_run(run_dir)
    run_b = load_run(run_dir)
    idx = torch.randint(0, run_a.tokenizer.vocab_size, (1, 10))
    torch.testing.assert_close(run_a.model(idx)[0], run_b.model(idx)[0])
    assert run_a.config.model.kind == kind
    assert run_a.labels == ("pos", "neg")


def test_load_run_names_the_missing_or_corrupted_file(make_run, tmp_path):
    with pytest.raises(AigcError, match="not found"):
        load_run(tmp_path / "nope")
    run_dir = make_run()
    (run_dir / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AigcError, match="model.safetensors"):
        load_run(run_dir)
    (run_dir / "model.safetensors").unlink()
    with pytest.raises(AigcError, match="model.safetensors is missing"):
        load_run(run_dir)


def test_state_round_trip_keeps_tensors_and_numbers(tmp_path):
    from aigc.artifacts.state import load_state, save_state

    state = {"step": 7, "elapsed_s": 1.5, "sampler": '{"a": 1}', "rng": torch.get_rng_state(), "nested": {"x": [1, 2]}}
    save_state(tmp_path, state)
    loaded = load_state(tmp_path)
    assert loaded["step"] == 7 and loaded["sampler"] == '{"a": 1}' and loaded["nested"] == {"x": [1, 2]}
    assert torch.equal(loaded["rng"], state["rng"])
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"], "no temp file left behind"


def test_load_state_names_a_missing_or_corrupted_file(tmp_path):
    from aigc.artifacts.state import load_state

    with pytest.raises(AigcError, match="state.pt is missing"):
        load_state(tmp_path)
    (tmp_path / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(AigcError, match="state.pt is corrupted"):
        load_state(tmp_path)


def test_old_config_with_lora_in_extra_loads_as_a_lora_run(make_run):
    """config.json written before the typed `weights` field kept the format as keys of `extra`."""
    run_dir = make_run("gpt")
    config = json.loads((run_dir / "config.json").read_text())
    config.pop("weights")
    config["extra"] = {"lora": {"rank": 2, "alpha": 4.0, "targets": ["c_attn"], "dropout": 0.0}, "note": "kept"}
    (run_dir / "config.json").write_text(json.dumps(config))
    migrated = read_run_config(run_dir)
    assert migrated.weights.format == "lora" and migrated.weights.lora["rank"] == 2
    assert migrated.extra == {"note": "kept"}


def test_weights_format_must_be_known_and_consistent():
    with pytest.raises(AigcError, match="unknown weights format 'gguf-q4'"):
        Weights("gguf-q4")
    with pytest.raises(AigcError, match="carry LoRA settings"):
        Weights("full", lora={"rank": 2})


def test_an_unregistered_weights_format_is_a_clear_error():
    with pytest.raises(AigcError, match="no loader for weights of format 'nope'; this aigc loads: full, int8, lora"):
        weights_loader("nope")
