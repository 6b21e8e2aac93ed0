"""`aigc train --init-from RUN --lora-rank R`: adapters learn a new corpus; the base stays as it was."""

from __future__ import annotations

import hashlib
import json
import random

import torch
from safetensors.torch import load_file

from aigc.artifacts.dataset import open_split
from aigc.cli import main
from aigc.evaluate.lm import document_sequences, score_sequences
from aigc.models import load_run
from aigc.models.lora import has_lora


def _recipes(n: int, seed: int = 0) -> str:
    """A corpus unlike the reviews the base tokenizer was trained on: short, regular recipes."""
    rng = random.Random(seed)
    foods = ["flour", "sugar", "butter", "rice", "beans", "apples", "milk", "onions"]
    verbs = ["mix", "stir", "whisk", "fold", "chop", "boil"]
    docs = [
        f"Recipe {i}: {rng.choice(verbs)} {rng.randint(1, 9)} cups of {rng.choice(foods)} with "
        f"{rng.choice(foods)}, then bake for {rng.randint(10, 60)} minutes."
        for i in range(n)
    ]
    return "\n\n".join(docs) + "\n"


def _prepare(tmp_path, tokenizer_path, docs: int, val_fraction: float):
    """A prepared recipes dataset that reuses the base run's tokenizer, as fine-tuning requires."""
    (tmp_path / "recipes.txt").write_text(_recipes(docs))
    data = tmp_path / "recipes"
    prepare = ["prepare", str(tmp_path / "recipes.txt"), "--out", str(data), "--tokenizer", str(tokenizer_path)]
    assert main([*prepare, "--no-dedup", "--no-redact", "--val-fraction", str(val_fraction)]) == 0
    return data


def _val_loss(model, data, eot_id: int, block_size: int) -> float:
    sequences = document_sequences(open_split(data, "val"), eot_id)
    scores = score_sequences(model, sequences, [1] * len(sequences), block_size=block_size)
    nll = torch.cat([torch.as_tensor(s[1]) for s in scores])
    return nll.mean().item()


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_lora_finetune_lowers_val_loss_and_leaves_the_base_unchanged(make_run, tmp_path):
    base_dir = make_run("gpt", name="base", seed=1)
    base_digest = _digest(base_dir / "model.safetensors")
    data = _prepare(tmp_path, base_dir / "tokenizer.json", docs=240, val_fraction=0.1)
    train = ["train", "--data", str(data), "--init-from", str(base_dir), "--out", str(tmp_path / "lora")]
    options = "--lora-rank 4 --lora-alpha 8 --lora-targets c_attn,c_fc --max-steps 30 --eval-every 30 --eval-batches 2"
    options += (
        " --batch-size 8 --learning-rate 3e-2 --warmup-steps 3 --sample-tokens 0 --device cpu --dtype fp32 --quiet"
    )
    assert main([*train, *options.split()]) == 0

    base, tuned = load_run(base_dir), load_run(tmp_path / "lora")
    assert has_lora(tuned.model)
    block = base.config.model.block_size
    before = _val_loss(base.model, data, base.tokenizer.eot_id, block)
    after = _val_loss(tuned.model, data, base.tokenizer.eot_id, block)
    assert after < before - 0.25, (before, after)  # measured: 5.99 -> 5.53 nats

    assert _digest(base_dir / "model.safetensors") == base_digest
    tuned_tensors = load_file(tmp_path / "lora" / "model.safetensors")
    # Only the adapters are stored; config.json names the base and its content hash.
    assert tuned_tensors and all(".lora_" in name for name in tuned_tensors)
    assert not any(name.endswith("c_proj.lora_A") for name in tuned_tensors)  # c_proj was not targeted

    saved = json.loads((tmp_path / "lora" / "config.json").read_text())
    assert saved["weights"]["format"] == "lora"
    assert saved["weights"]["lora"] == {"rank": 4, "alpha": 8.0, "targets": ["c_attn", "c_fc"], "dropout": 0.0}
    assert saved["weights"]["base"] == str(base_dir.resolve()) and saved["weights"]["base_sha256"] == base_digest
    adapters = sum(t.numel() for t in tuned_tensors.values())
    assert saved["extra"]["parameters"] == {"trainable": adapters, "total": base.model.num_params() + adapters}
    base_tensors = load_file(base_dir / "model.safetensors")
    state = tuned.model.state_dict()
    assert all(torch.equal(state[name], base_tensors[name]) for name in base_tensors)  # the base, as it was

    # Resuming keeps the adapters (and the frozen base) from the saved config and state.
    assert main(["train", "--resume", str(tmp_path / "lora"), "--max-steps", "32", "--quiet"]) == 0
    resumed = load_file(tmp_path / "lora" / "model.safetensors")
    assert resumed.keys() == tuned_tensors.keys()
    assert not torch.equal(resumed["h.0.attn.c_attn.lora_B"], tuned_tensors["h.0.attn.c_attn.lora_B"])
    assert (tmp_path / "lora" / "state.pt").stat().st_size < (base_dir / "model.safetensors").stat().st_size


def test_lora_run_with_a_changed_or_missing_base_is_a_one_line_error(make_run, tmp_path, capsys):
    base_dir = make_run("gpt", name="base", seed=1)
    data = _prepare(tmp_path, base_dir / "tokenizer.json", docs=60, val_fraction=0.2)
    train = ["train", "--data", str(data), "--init-from", str(base_dir), "--out", str(tmp_path / "lora")]
    options = "--lora-rank 2 --max-steps 2 --eval-every 2 --eval-batches 1 --sample-tokens 0 --device cpu --quiet"
    assert main([*train, *options.split()]) == 0
    generate = ["generate", str(tmp_path / "lora"), "--max-new-tokens", "3", "--seed", "1"]
    assert main(generate) == 0
    capsys.readouterr()

    make_run("gpt", name="base", seed=2)  # another model in the same folder
    assert main(generate) == 2
    err = capsys.readouterr().err.strip()
    assert "changed since the adapters were trained" in err and "\n" not in err

    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        (base_dir / name).unlink()
    assert main(generate) == 2
    assert "of these LoRA adapters is missing" in capsys.readouterr().err


def test_lora_rank_without_init_from_is_refused(make_run, tmp_path, capsys):
    base_dir = make_run("gpt", name="base")
    data = _prepare(tmp_path, base_dir / "tokenizer.json", docs=60, val_fraction=0.2)
    command = ["train", "--data", str(data), "--out", str(tmp_path / "lora"), "--preset", "tiny", "--lora-rank", "4"]
    assert main([*command, "--max-steps", "2", "--device", "cpu", "--quiet"]) == 2
    assert "--lora-rank needs --init-from RUN" in capsys.readouterr().err


def test_init_from_an_unmerged_lora_run_asks_for_a_merge(make_run, tmp_path, capsys):
    from aigc.artifacts.run import RunConfig, Weights, save_run
    from aigc.models.lora import LoRASpec, apply_lora

    base = load_run(make_run("gpt", name="base"))
    apply_lora(base.model, LoRASpec(rank=2, alpha=2.0))
    config = RunConfig(model=base.config.model, weights=Weights("lora", lora=LoRASpec(rank=2, alpha=2.0).to_json()))
    lora_dir = save_run(tmp_path / "lora", config, base.tokenizer, base.model)
    data = _prepare(tmp_path, lora_dir / "tokenizer.json", docs=60, val_fraction=0.2)
    command = ["train", "--data", str(data), "--init-from", str(lora_dir), "--out", str(tmp_path / "next")]
    assert main([*command, "--max-steps", "2", "--device", "cpu", "--quiet"]) == 2
    assert f"is a LoRA run; merge its adapters first: `aigc merge {lora_dir}`" in capsys.readouterr().err
