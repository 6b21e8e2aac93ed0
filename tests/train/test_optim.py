import math

import pytest
import torch

from aigc.config import TrainConfig, model_preset
from aigc.models import build_model
from aigc.train.optim import build_optimizer, learning_rate


def test_learning_rate_warms_up_then_decays_to_floor():
    config = TrainConfig(learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(0, 0.0, config) == pytest.approx(1e-4)
    assert learning_rate(9, 0.0, config) == pytest.approx(1e-3)
    assert learning_rate(50, 0.5, config) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))
    assert learning_rate(99, 1.0, config) == pytest.approx(1e-4)
    rates = [learning_rate(s, s / 100, config) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(rates, rates[1:])), "no increase after warm-up"


def test_learning_rate_has_no_jump_where_warmup_ends():
    config = TrainConfig(learning_rate=1e-3, warmup_steps=20)
    before, after = learning_rate(19, 0.19, config), learning_rate(20, 0.2, config)
    assert abs(after - before) < 0.02 * config.learning_rate


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_build_optimizer_skips_frozen_and_decays_only_matrices(kind):
    model = build_model(model_preset("tiny", kind=kind, vocab_size=300))
    embedding = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))
    embedding.weight.requires_grad_(False)
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    all_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(embedding.weight) not in all_ids
    assert all(p.dim() == 2 for p in model.parameters() if id(p) in decayed)
    assert any(p.dim() == 1 for p in model.parameters() if id(p) in all_ids - decayed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == trainable
    assert optimizer.defaults["fused"] is True
    assert not math.isnan(optimizer.defaults["lr"])


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_label_rows_learn_at_their_own_scale_of_the_learning_rate(scale):
    from aigc.models.vocab import grow_frozen
    from aigc.train.optim import set_learning_rate

    model = build_model(model_preset("tiny", vocab_size=300))
    for p in model.parameters():
        p.requires_grad_(False)
    grow_frozen(model, torch.zeros(2, model.config.n_embd))  # two label rows, as LoRA grows the vocabulary
    model.h[0].mlp.c_fc.weight.requires_grad_(True)  # stands in for an adapter
    optimizer = build_optimizer(model, TrainConfig(label_lr_scale=scale), torch.device("cpu"))
    set_learning_rate(optimizer, 2e-3)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lr_of[id(model.wte.new_rows)] == pytest.approx(2e-3 * scale)
    assert lr_of[id(model.h[0].mlp.c_fc.weight)] == pytest.approx(2e-3)
    # Unscaled, the groups stay as before the option existed: optimizer states saved then still load.
    scaled = [g["params"] for g in optimizer.param_groups if "lr_scale" in g]
    assert scaled == ([] if scale == 1.0 else [[model.wte.new_rows]])


def test_label_lr_scale_must_be_positive():
    from aigc.errors import AigcError

    with pytest.raises(AigcError, match="--label-lr-scale"):
        TrainConfig(label_lr_scale=0)
