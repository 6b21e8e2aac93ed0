import pytest
import torch

from aigc.errors import AigcError
from aigc.train.checkpoint import load_run


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
