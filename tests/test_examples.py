"""The math companion: gradient-descent regression, and the models' losses/activations vs textbook formulas."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aigc.config import model_preset
from aigc.models import build_model

_PATH = Path(__file__).resolve().parents[1] / "examples" / "linear_regression.py"
_SPEC = importlib.util.spec_from_file_location("linear_regression", _PATH)
linreg = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(linreg)


def test_linear_regression_converges_to_closed_form():
    x, y = linreg.make_data()
    w, b, losses = linreg.fit(x, y, lr=0.1, steps=300)
    exact_w, exact_b = linreg.closed_form(x, y)
    assert np.allclose(w, exact_w, atol=1e-6) and b == pytest.approx(exact_b, abs=1e-6)
    # With a small enough step the loss never rises (up to rounding once it sits at the optimum).
    assert all(later <= earlier + 1e-12 for earlier, later in zip(losses, losses[1:]))


def test_linear_regression_gradient_matches_autograd():
    x, y = linreg.make_data(n=50, seed=1)
    w, b = np.array([0.3, -0.7]), 0.2
    grad_w, grad_b = linreg.gradients(x, y, w, b)
    tw = torch.tensor(w, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    loss = ((torch.tensor(x) @ tw + tb - torch.tensor(y)) ** 2).mean()
    loss.backward()
    assert np.allclose(grad_w, tw.grad.numpy()) and grad_b == pytest.approx(tb.grad.item())


def test_linear_regression_steps_equal_torch_sgd():
    x, y = linreg.make_data(n=100, seed=2)
    w, b, _ = linreg.fit(x, y, lr=0.05, steps=25)
    layer = torch.nn.Linear(2, 1, dtype=torch.float64)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.05)
    tx, ty = torch.tensor(x), torch.tensor(y).unsqueeze(1)
    for _ in range(25):
        optimizer.zero_grad()
        F.mse_loss(layer(tx), ty).backward()
        optimizer.step()
    assert np.allclose(layer.weight.detach().numpy()[0], w, atol=1e-12)
    assert layer.bias.item() == pytest.approx(b, abs=1e-12)


def test_mse_and_relu_match_textbook_formulas():
    a, b = torch.randn(10, generator=torch.Generator().manual_seed(0)), torch.linspace(-1, 1, 10)
    assert F.mse_loss(a, b).item() == pytest.approx(sum((p - q) ** 2 for p, q in zip(a.tolist(), b.tolist())) / 10)
    assert torch.relu(b).tolist() == [max(0.0, v) for v in b.tolist()]


def test_gpt_loss_is_textbook_cross_entropy_and_mlp_uses_tanh_gelu():
    torch.manual_seed(0)
    model = build_model(model_preset("tiny", vocab_size=50)).eval()
    idx = torch.randint(0, 50, (2, 12))
    targets = torch.randint(0, 50, (2, 12))
    logits, loss = model(idx, targets)
    probs = logits.exp() / logits.exp().sum(-1, keepdim=True)  # softmax by its definition
    expected = -probs.gather(-1, targets.unsqueeze(-1)).log().mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    mlp = model.h[0].mlp
    x = 3 * torch.randn(5, 64)  # (5, n_embd)
    hidden = mlp.c_fc(x)  # (5, 4 * n_embd)
    gelu = 0.5 * hidden * (1 + torch.tanh(math.sqrt(2 / math.pi) * (hidden + 0.044715 * hidden**3)))
    assert torch.allclose(mlp.c_proj(gelu), mlp(x), atol=1e-6)


def test_lstm_cell_is_textbook_sigmoid_tanh_gates():
    torch.manual_seed(0)
    model = build_model(model_preset("tiny", kind="lstm", vocab_size=30, n_layer=1)).eval()
    lstm = model.lstm
    x = model.embedding(torch.tensor([[3]]))[0, 0]  # (E,)
    out, (h, c) = lstm(x.view(1, 1, -1))
    gates = lstm.weight_ih_l0 @ x + lstm.bias_ih_l0 + lstm.bias_hh_l0  # h0 = 0, so W_hh·h0 vanishes
    i, f, g, o = gates.chunk(4)  # PyTorch's gate order: input, forget, cell, output
    sigmoid = lambda z: 1 / (1 + torch.exp(-z))  # noqa: E731
    tanh = lambda z: (torch.exp(z) - torch.exp(-z)) / (torch.exp(z) + torch.exp(-z))  # noqa: E731
    cell = sigmoid(i) * tanh(g)  # f * c0 vanishes with c0 = 0
    assert torch.allclose(c[0, 0], cell, atol=1e-6)
    assert torch.allclose(h[0, 0], sigmoid(o) * tanh(cell), atol=1e-6)
    assert torch.allclose(out[0, 0], h[0, 0])
