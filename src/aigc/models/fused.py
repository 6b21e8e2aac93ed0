"""Training-time fused operations: the forward and backward of each written out, so that a training
step keeps fewer activations, makes fewer passes over memory and never holds a full fp32 B x T x V
logits tensor.

Each is an `torch.autograd.Function` over ordinary PyTorch ops (matrix products and a few elementwise
passes), RMSNorm (with the residual add before it), SwiGLU and rotary over the native kernels of
`native_train` where those serve (PyTorch's ops otherwise); tests/models/test_fused.py checks outputs
and gradients of both against the eager formulation in fp32 (tight) and bf16 (looser). They compute
in the dtype of their inputs (bf16 stays bf16, with fp32 for the reductions that need it). `GPT` uses
them while training with gradients on (`GPT.fused_training`).

Why own functions rather than `torch.compile`: on a 2-core Xeon (AMX, torch 2.13, 2026-12-03) a compile
of the whole SmolLM2-135M LoRA loss took 93 s for +7 % on top of bf16 weights, i.e. it pays back only
after a run of many minutes; these functions, and the native kernels (compiled once per machine, about a
second of compiler time, and cached), cost nothing to start (docs/benchmarks.md has the A/B).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from aigc.models import native_train

# Longest sequence for which `causal_attention` keeps the (B, h, T, T) probabilities for the backward
# pass; longer ones use PyTorch's flash kernel, which recomputes them. At T = 128, batch 4, SmolLM2's 9
# heads, forward + backward took 3.2 ms against flash's 19.6 ms (bf16, 2-core Xeon with AMX).
MATH_ATTENTION_MAX_T = 256
# Rows of the output layer computed at once: (rows, V) logits, e.g. 256 x 49,155 x 4 bytes = 50 MB.
CE_CHUNK_ROWS = 256


def no_autocast(forward):
    """Run a Function's forward with autocast off: its inputs are already in the compute dtype, and
    autocast would otherwise re-cast operands inside (e.g. a bf16 softmax output fed to a product)."""

    @functools.wraps(forward)
    def wrapper(ctx, *args):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return forward(ctx, *args)

    return wrapper


class _CausalAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(hs) + causal mask) v with grouped-query heads, as batched matrix products.

    The heads that share a key/value head are stacked along the rows, so one product per group
    serves them all and the key/value gradients come out already summed over the group."""

    @staticmethod
    @no_autocast
    def forward(ctx, q, k, v):  # q (B, nh, T, hs); k, v (B, nkv, T, hs)
        B, H, T, D = q.shape
        G = k.shape[1]
        scale = D**-0.5
        qg = q.reshape(B * G, (H // G) * T, D)  # (B nkv, g T, hs): head h uses key/value head h // g
        kg, vg = k.reshape(B * G, T, D), v.reshape(B * G, T, D)
        bias = _causal_bias(T, H // G, q.dtype, q.device)  # (g T, T): 0 or -inf
        scores = torch.baddbmm(bias, qg, kg.transpose(1, 2), alpha=scale)  # (B nkv, g T, T)
        probs = torch.softmax(scores, dim=-1)  # reduced in fp32 internally, stored in q's dtype
        ctx.save_for_backward(qg, kg, vg, probs)
        ctx.shape, ctx.scale = (B, H, T, D), scale
        return torch.bmm(probs, vg).view(B, H, T, D)

    @staticmethod
    def backward(ctx, grad_out):
        qg, kg, vg, probs = ctx.saved_tensors
        B, H, T, D = ctx.shape
        grad = grad_out.reshape(qg.shape)  # (B nkv, g T, hs)
        grad_v = torch.bmm(probs.transpose(1, 2), grad)  # (B nkv, T, hs)
        grad_p = torch.bmm(grad, vg.transpose(1, 2))  # (B nkv, g T, T)
        # softmax backward, p * (dP - rowsum(dP * p)), as autograd's own kernel does it (one pass,
        # reduced in fp32, written in p's dtype).
        grad_s = torch.ops.aten._softmax_backward_data(grad_p, probs, -1, probs.dtype)
        grad_q = torch.bmm(grad_s, kg).mul_(ctx.scale)
        grad_k = torch.bmm(grad_s.transpose(1, 2), qg).mul_(ctx.scale)
        G = kg.shape[0] // B
        return grad_q.view(B, H, T, D), grad_k.view(B, G, T, D), grad_v.view(B, G, T, D)


_BIAS_CACHE: dict[tuple, torch.Tensor] = {}


def _causal_bias(T: int, groups: int, dtype: torch.dtype, device) -> torch.Tensor:
    key = (T, groups, dtype, str(device))
    if key not in _BIAS_CACHE:
        allowed = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        bias = torch.zeros(T, T, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
        _BIAS_CACHE[key] = bias.repeat(groups, 1)  # (g T, T)
    return _BIAS_CACHE[key]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal self-attention of (B, nh, T, hs) queries over (B, nkv, T, hs) keys and values."""
    if q.shape[2] > MATH_ATTENTION_MAX_T or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
    return _CausalAttention.apply(q, k, v)


class _RMSNorm(torch.autograd.Function):
    """x / rms(x) * w over the last dim in x's dtype, the mean square accumulated in fp32 (one pass
    of `vector_norm`); keeps x and the (..., 1) reciprocal rms. In bf16 at batch 4 x 128 x 576,
    forward + backward took 1.69 ms against 2.30 for an fp32 round trip and 2.41 for `F.rms_norm`."""

    @staticmethod
    @no_autocast
    def forward(ctx, x, weight, eps: float):
        kernels = native_train.kernels_for(x, weight)
        if kernels is not None:  # one native pass; rstd (rows,) fp32
            _, out, rstd = native_train.rms_norm_forward(kernels, x, weight, eps)
            ctx.save_for_backward(x, weight, rstd.view(*x.shape[:-1], 1))
            return out
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)  # (..., 1)
        rstd = torch.rsqrt(norm.square_().div_(x.shape[-1]).add_(eps))
        ctx.save_for_backward(x, weight, rstd)
        return x * rstd.to(x.dtype) * weight

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        grad = grad.contiguous()
        kernels = native_train.kernels_for(x, weight, grad)
        if kernels is not None and not ctx.needs_input_grad[1]:  # a frozen weight (LoRA): one native pass
            return native_train.rms_norm_backward(kernels, x, weight, rstd, grad), None, None
        r = rstd.to(x.dtype)
        gw = grad * weight  # (..., C)
        # d/dx of x * rstd * w: rstd * (gw - x * rstd^2 * mean(gw * x))
        dot = (gw * x).sum(-1, keepdim=True, dtype=torch.float32) * rstd.square() / x.shape[-1]  # (..., 1)
        grad_x = (gw - x * dot.to(x.dtype)) * r
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * x * r).flatten(0, -2).sum(0, dtype=torch.float32).to(weight.dtype)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`F.rms_norm(x, (C,), weight, eps)`; under autocast in the input's dtype, as the residual stream is."""
    return _RMSNorm.apply(x, weight.to(x.dtype) if weight.dtype != x.dtype else weight, eps)


class _AddRMSNorm(torch.autograd.Function):
    """(s, rms_norm(s)) for s = x + delta, the residual add and the next norm in one native pass each way
    (a frozen norm weight only: LoRA). The backward adds the gradient that reaches s by the residual path
    to the norm's, in the same pass, and hands it to both x and delta."""

    @staticmethod
    @no_autocast
    def forward(ctx, x, delta, weight, eps: float):
        s, out, rstd = native_train.rms_norm_forward(native_train.kernels_for(x, delta, weight), x, weight, eps, delta)
        ctx.save_for_backward(s, weight, rstd)
        ctx.set_materialize_grads(False)  # an unused s (the last block's) gets no zero-filled gradient
        return s, out

    @staticmethod
    def backward(ctx, grad_s, grad_out):
        s, weight, rstd = ctx.saved_tensors
        grad_out = torch.zeros_like(s) if grad_out is None else grad_out.contiguous()
        grad_s = None if grad_s is None else grad_s.contiguous()
        grad = native_train.rms_norm_backward(native_train.kernels_for(s), s, weight, rstd, grad_out, grad_s)
        return grad, grad, None, None


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + delta, `rms_norm(x + delta, weight, eps)`), the residual stream and its norm; one native pass
    where the kernels serve and the weight is frozen."""
    dtype = torch.promote_types(x.dtype, delta.dtype)  # as `x + delta` would give
    x, delta, weight = x.to(dtype), delta.to(dtype), weight.to(dtype)
    if weight.requires_grad or native_train.kernels_for(x, delta, weight) is None:
        s = x + delta
        return s, rms_norm(s, weight, eps)
    return _AddRMSNorm.apply(x, delta, weight, eps)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up for h = [gate | up] (..., 2H); keeps h and silu(gate) (as the eager form does)
    and runs the gate's backward as one `silu_backward` pass: 3.09 ms forward + backward against 3.68
    eager, bf16 at batch 4 x 128 x 1536; recomputing silu(gate) instead of keeping it took 4.08."""

    @staticmethod
    @no_autocast
    def forward(ctx, h):
        kernels = native_train.kernels_for(h)
        if kernels is not None:  # one native pass each way, silu recomputed in the backward: keeps h only
            ctx.save_for_backward(h)
            return native_train.swiglu_forward(kernels, h)
        gate, up = h.chunk(2, dim=-1)
        silu = F.silu(gate)
        ctx.save_for_backward(h, silu)
        return silu * up

    @staticmethod
    def backward(ctx, grad):
        h, *kept = ctx.saved_tensors
        if not kept:
            return native_train.swiglu_backward(native_train.kernels_for(h), h, grad.contiguous())
        silu = kept[0]
        gate, up = h.chunk(2, dim=-1)
        return torch.cat((torch.ops.aten.silu_backward(grad * up, gate), grad * silu), dim=-1)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h (..., 2H) holding gate then up."""
    return _SwiGLU.apply(h)


class _Rotary(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin; the backward is the inverse rotation, so nothing of x is kept."""

    @staticmethod
    @no_autocast
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, sign=1.0)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, sign=-1.0), None, None


def _rotate(x, cos, sin, sign: float):
    """x * cos + sign * rotate_half(x) * sin with rotate_half(x) = [-x2, x1] (sin's halves are equal)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    s = sin[..., :half] * sign
    out = x * cos
    out[..., :half] -= x2 * s
    out[..., half:] += x1 * s
    return out


class _QKVRotary(torch.autograd.Function):
    """qkv (B, T, (H + 2 G) D) -> rotated q (B, H, T, D), rotated k and v (B, G, T, D), contiguous, in one
    native pass each way (`native_train.qkv_rotary`): the rotation and the head-major layout that
    attention's batched products read, without the transposed copies and the split's concatenation."""

    @staticmethod
    @no_autocast
    def forward(ctx, qkv, cos, sin, heads: tuple[int, int]):  # cos, sin (T, D) float32
        ctx.save_for_backward(cos, sin)
        return native_train.qkv_rotary(native_train.kernels_for(qkv), qkv, cos, sin, heads)

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        cos, sin = ctx.saved_tensors
        grads = [g.contiguous() for g in (grad_q, grad_k, grad_v)]
        return native_train.qkv_rotary_backward(native_train.kernels_for(*grads), grads, cos, sin), None, None, None


def qkv_rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: tuple[int, int]):
    """Queries (B, H, T, D), keys and values (B, G, T, D) from qkv (B, T, (H + 2 G) D), the queries and
    keys rotated by the tables cos, sin (1, 1, T, D); None where the native kernels cannot serve."""
    if cos.dim() != 4 or cos.shape[0] != 1 or native_train.kernels_for(qkv) is None:
        return None
    tables = [t[0, 0].float().contiguous() for t in (cos, sin)]  # (T, D)
    return _QKVRotary.apply(qkv, *tables, heads)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`gpt.apply_rotary` for (B, h, T, hs) queries or keys, tables (B | 1, 1, T, hs)."""
    return _Rotary.apply(x, cos.to(x.dtype), sin.to(x.dtype))


class _LinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of (x W^T) against targets, -1 ignored, in row chunks; W = cat(weights).

    The loss is the graph's end, so the gradients are computed in the forward pass, chunk by chunk,
    while the logits are at hand (no recomputation and no stored logits); backward only scales them
    by the incoming gradient. Logits are (rows, V) in the compute dtype, reduced in fp32. Only
    the parts of W that require grad get one (a frozen table with a few new trainable rows: the rows)."""

    @staticmethod
    @no_autocast
    def forward(ctx, x, targets, dtype, joined, *weights):  # x (N, C), targets (N,), weights (V_i, C)
        x = x.to(dtype)
        if joined is not None:  # the caller's cat(weights) in dtype
            weight = joined(dtype)
        else:
            weight = torch.cat([w.to(dtype) for w in weights]) if len(weights) > 1 else weights[0].to(dtype)  # (V, C)
        ends = torch.tensor([w.shape[0] for w in weights]).cumsum(0).tolist()
        trained = [i for i, w in enumerate(weights) if ctx.needs_input_grad[4 + i]]
        valid = targets != -1
        scale = 1.0 / valid.sum().clamp(min=1).to(torch.float32)
        grad_x = torch.empty_like(x)
        grad_w: dict[int, torch.Tensor] = {}  # fp32, from the first chunk's product (no zero fill)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, x.shape[0], CE_CHUNK_ROWS):
            rows = slice(start, start + CE_CHUNK_ROWS)
            xc, tc, vc = x[rows], targets[rows].clamp(min=0), valid[rows]
            # In the compute dtype: the kernel reduces in fp32 either way, and writing bf16 took 11 ms
            # for 256 x 49,152 against 55 ms for an fp32 result (one thread, AMX Xeon).
            probs = torch.softmax(_chunk_logits(xc, weight), dim=-1)  # (n, V)
            index = torch.arange(probs.shape[0], device=x.device)
            picked = probs[index, tc]  # (n,)
            loss -= (picked.float().clamp(min=1e-30).log() * vc).sum()
            probs[index, tc] = picked - 1  # softmax - one-hot: the gradient of the logits, unscaled
            # Each row's weight (1/count, or 0 if ignored) is applied to the small (n, C) operands and
            # results, never to the (n, V) tensor (a bf16 broadcast multiply there cost as much as a product).
            row_scale = (vc * scale)[:, None]  # (n, 1) fp32
            grad_x[rows] = (probs @ weight) * row_scale
            scaled_x = (xc * row_scale).to(dtype)  # (n, C)
            for i in trained:
                part = probs[:, ends[i] - weights[i].shape[0] : ends[i]]  # (n, V_i)
                _accumulate_product(grad_w, i, part.t(), scaled_x)
        for i in trained:  # no rows at all: no chunk made the sums
            grad_w.setdefault(i, torch.zeros(weights[i].shape, dtype=torch.float32, device=x.device))
        ctx.save_for_backward(grad_x, *(grad_w[i] for i in trained))
        ctx.trained, ctx.count, ctx.dtypes = trained, len(weights), [w.dtype for w in weights]
        return loss * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, *saved = ctx.saved_tensors
        # The loss is usually the graph's end (gradient exactly 1): then the (V, C) gradients pass as
        # they are, where multiplying would be one more pass over 113 MB (SmolLM2, fp32).
        unit = grad_loss.device.type == "cpu" and grad_loss.item() == 1.0
        grads: list[torch.Tensor | None] = [None] * ctx.count
        for i, grad in zip(ctx.trained, saved):
            grads[i] = (grad if unit else grad * grad_loss).to(ctx.dtypes[i])
        return grad_x * grad_loss.to(grad_x.dtype), None, None, None, *grads


def _chunk_logits(xc: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """xc W^T, (n, C) x (V, C) -> (n, V) contiguous. In fp32 on the CPU it is formed as (W xc^T)^T:
    with V >> n the BLAS ran x W^T at half speed, 189 ms for 256 x 576 x 49,153 on a 2-core AVX2 EPYC
    (2026-12-04), against 125 ms for W x^T with the transposed copy (docs/benchmarks.md)."""
    if weight.dtype == torch.float32 and weight.device.type == "cpu":
        return (weight @ xc.t()).t().contiguous()
    return xc @ weight.t()


def _accumulate_product(sums: dict[int, torch.Tensor], key: int, a: torch.Tensor, b: torch.Tensor) -> None:
    """sums[key] += a @ b in fp32: the first product becomes the sum, and later ones accumulate in
    place where the operands are fp32 too (no zero-filled start, no temporary the size of the sum)."""
    if key not in sums:
        sums[key] = (a @ b).float()
    elif a.dtype == sums[key].dtype:
        sums[key].addmm_(a, b)
    else:
        sums[key] += a @ b


def linear_cross_entropy(
    x: torch.Tensor, weights: tuple[torch.Tensor, ...], targets: torch.Tensor, joined=None
) -> torch.Tensor:
    """`F.cross_entropy(x @ cat(weights)^T, targets, ignore_index=-1)` for x (N, C) and weights (V_i, C)
    (the output layer, possibly a frozen table and new trainable rows), never holding all the logits.
    Under autocast the products run in its dtype, as `F.linear` would. joined: optionally a function
    of the dtype that gives cat(weights) in it (a caller that keeps the concatenation between steps)."""
    return _LinearCrossEntropy.apply(x, targets, compute_dtype(x), joined, *weights)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype products of `x` run in: autocast's where it is on, else x's (as `F.linear`'s)."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class _LoRALinear(torch.autograd.Function):
    """x W^T + b + s (x A^T) B^T for a frozen W, b and trainable A (r, in), B (out, r).

    Eager autograd copies the base product to add the update (`addmm`), adds the input gradient of the
    base and of the adapter as a third (N, in) pass, and casts A and B once per use; here the update
    and the adapter's input gradient accumulate in place onto the (N, out) and (N, in) products, and
    A and B are cast once per step. Frozen W and b get no gradient (a LoRA base never trains)."""

    @staticmethod
    @no_autocast
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float):
        rows = x.reshape(-1, x.shape[-1])  # (N, in)
        a, b = lora_A.to(x.dtype), lora_B.to(x.dtype)  # (r, in), (out, r)
        low = rows @ a.t()  # (N, r)
        out = rows @ weight.t() if bias is None else torch.addmm(bias, rows, weight.t())  # (N, out)
        out.addmm_(low, b.t(), alpha=scaling)
        ctx.save_for_backward(rows, weight, a, b, low)
        ctx.scaling, ctx.dtypes, ctx.shape_in = scaling, (lora_A.dtype, lora_B.dtype), x.shape
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        rows, weight, a, b, low = ctx.saved_tensors
        grad = grad.reshape(-1, weight.shape[0])  # (N, out)
        grad_low = (grad @ b).mul_(ctx.scaling)  # (N, r)
        grad_x = (grad @ weight).addmm_(grad_low, a)  # (N, in)
        grad_a = (grad_low.t() @ rows).to(ctx.dtypes[0])  # (r, in)
        grad_b = (grad.t() @ low).mul_(ctx.scaling).to(ctx.dtypes[1])  # (out, r)
        return grad_x.view(*ctx.shape_in), None, None, grad_a, grad_b, None


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """`F.linear(x, weight, bias) + scaling * F.linear(F.linear(x, lora_A), lora_B)` with weight and bias
    frozen; under autocast in its dtype, as `F.linear` would be."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("lora_linear trains only the adapters; the base weight and bias must be frozen")
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return _LoRALinear.apply(x, weight, bias, lora_A, lora_B, scaling)
