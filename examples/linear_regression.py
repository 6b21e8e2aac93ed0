"""Linear regression by gradient descent: the idea under every model in aigc, small enough to read.

Two features, a bias, and the mean squared error

    L(w, b) = (1/n) Σᵢ (xᵢ·w + b − yᵢ)²

whose gradient is

    ∂L/∂w = (2/n) Xᵀ r,   ∂L/∂b = (2/n) Σᵢ rᵢ,   with residuals r = Xw + b − y.

Each step moves the parameters a little along the negative gradient, w ← w − η ∂L/∂w, which is what
`torch.optim.SGD` does for the GPT's millions of parameters (AdamW only rescales the step). Because
this loss is a convex quadratic, the steps converge to the closed-form least-squares solution, which
`tests/test_examples.py` checks, together with step-for-step agreement with `torch.optim.SGD`.

Run: python examples/linear_regression.py
"""

from __future__ import annotations

import numpy as np


def make_data(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """y = 3·x₁ − 2·x₂ + 0.5 + noise, with x drawn from a standard normal."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))  # (n, 2)
    y = x @ np.array([3.0, -2.0]) + 0.5 + 0.1 * rng.normal(size=n)  # (n,)
    return x, y


def mse(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: float) -> float:
    return float(np.mean((x @ w + b - y) ** 2))


def gradients(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: float) -> tuple[np.ndarray, float]:
    """(∂L/∂w, ∂L/∂b) of the mean squared error, from the formula in the module docstring."""
    residual = x @ w + b - y  # (n,)
    return 2.0 / len(y) * x.T @ residual, 2.0 / len(y) * float(residual.sum())


def fit(x: np.ndarray, y: np.ndarray, lr: float = 0.1, steps: int = 300) -> tuple[np.ndarray, float, list[float]]:
    """Plain gradient descent from zero; returns the weights, the bias and the loss before each step."""
    w, b = np.zeros(x.shape[1]), 0.0
    losses = []
    for _ in range(steps):
        losses.append(mse(x, y, w, b))
        grad_w, grad_b = gradients(x, y, w, b)
        w, b = w - lr * grad_w, b - lr * grad_b
    return w, b, losses


def closed_form(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """The exact least-squares solution, solving [X 1]·θ ≈ y."""
    design = np.hstack([x, np.ones((len(x), 1))])  # (n, 3)
    theta, *_ = np.linalg.lstsq(design, y, rcond=None)
    return theta[:2], float(theta[2])


def main() -> None:
    x, y = make_data()
    w, b, losses = fit(x, y)
    exact_w, exact_b = closed_form(x, y)
    print(f"loss: {losses[0]:.4f} at the start, {losses[-1]:.4f} after {len(losses)} steps")
    print(f"gradient descent: w = {np.round(w, 4)}, b = {b:.4f}")
    print(f"closed form:      w = {np.round(exact_w, 4)}, b = {exact_b:.4f}")


if __name__ == "__main__":
    main()
