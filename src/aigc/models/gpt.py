"""One decoder-only transformer, configured as GPT-2 or as a Llama-family model.

Pre-norm blocks throughout. The `ModelConfig` defaults give exactly GPT-2 (Radford et al. 2019):
LayerNorm, learned absolute positions, tanh-GELU MLP, biases, tied input/output embeddings, so a
run exports to a `transformers` GPT2LMHeadModel with no conversion of the maths. The Llama family
(Touvron et al. 2023; Qwen2, Mistral) differs only by fields: RMSNorm (Zhang & Sennrich 2019),
rotary positions (Su et al. 2021, in Hugging Face's non-interleaved `rotate_half` layout, so their
weights map with no permutation), SwiGLU (Shazeer 2020), grouped-query attention (Ainslie et al.
2023), no biases (Qwen2: on q/k/v only), tied or separate output layer.

Module names are GPT-2's for both, and q/k/v stay fused in `attn.c_attn` (output
(n_head + 2 * n_kv_head) * head_dim), gate/up in `mlp.c_fc`, so LoRA and int8 treat both alike.
Every linear layer is `aigc.models.packed.Linear`, an nn.Linear that runs from a oneDNN-packed copy
of its weight in CPU inference (1.6-1.9x faster products).

Contract: `forward(idx, targets=None) -> (logits, loss | None)`. For decoding, pass a `KVCache`
(from `new_cache`) and optionally per-token `positions` and a `pad_mask` so that left-padded
prompts of different lengths decode together in one batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from aigc.config import ModelConfig
from aigc.models import fused, native
from aigc.models.packed import Linear

# Positions a fresh cache holds before it first grows (it doubles as needed, up to block_size).
FIRST_CAPACITY = 256


class KVCache:
    """Keys/values of every layer for the tokens seen so far; filled in place by `GPT.forward`.

    One (2, B, n_kv_head, capacity, hs) tensor per layer holds keys then values and is never
    concatenated. With grouped-query attention only the n_kv_head shared heads are stored. The
    capacity starts small and doubles when a forward needs more (up to block_size): preallocating
    block_size positions cost 0.8 s per decode at batch 16 for SmolLM2 (2048 positions, 1.5 GB to
    zero), more than the 128 steps after it (docs/benchmarks.md). Positions past `length` are
    uninitialised and never read.
    """

    def __init__(self, config: ModelConfig, batch_size: int, device, dtype: torch.dtype):
        self.block_size, self.n_layer = config.block_size, config.n_layer
        shape = (2, batch_size, config.kv_heads, 0, config.head_dim)
        self.kv = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        # True where a cached position holds a real (non-padding) token.   # (B, block_size)
        self.valid = torch.ones(batch_size, config.block_size, device=device, dtype=torch.bool)
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin (block_size, hs), see `rope_for`
        # Whether any cached position is padding: tracked in Python so a decode step needs no device sync.
        self.padded = False
        self.length = 0

    @property
    def capacity(self) -> int:
        """Positions allocated now (`length` of them filled)."""
        return self.kv[0].shape[3]

    def reserve(self, positions: int) -> None:
        """Make room for `positions` tokens in all: double the capacity (at least) and keep the filled part."""
        if positions <= self.capacity:
            return
        size = min(self.block_size, max(positions, 2 * self.capacity, FIRST_CAPACITY))
        grown = []
        for kv in self.kv:
            new = kv.new_empty(kv.shape[:3] + (size, kv.shape[4]))
            new[:, :, :, : self.length] = kv[:, :, :, : self.length]
            grown.append(new)
        self.kv = grown

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (e.g. drop finished sequences)."""
        self.kv = [kv[:, index] for kv in self.kv]
        self.valid = self.valid[index]


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin (B | 1, 1, T, hs) for position ids (B | 1, T), Hugging Face Llama's layout: the
    frequency of pair i is theta^(-2i/hs), repeated for both halves. Computed in float32 from the
    positions of each row, so left-padded rows rotate by their own positions."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)  # (hs/2,)
    freqs = positions.float().unsqueeze(-1) * inv_freq  # (B, T, hs/2)
    angles = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # (B, 1, T, hs)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def cached_rotary_tables(cache: KVCache, positions: torch.Tensor, config: ModelConfig, dtype: torch.dtype):
    """`rotary_tables` for a decode session: the cos/sin rows of every position up to block_size are
    computed once per cache (by the same formula, so the same bits) and each step gathers its rows."""
    if cache.rope is None or cache.rope[0].dtype != dtype:
        every = torch.arange(config.block_size, device=positions.device).unsqueeze(0)  # (1, block)
        cos, sin = rotary_tables(every, config.head_dim, config.rope_theta, dtype)  # (1, 1, block, hs)
        cache.rope = cos[0, 0], sin[0, 0]
    return cache.rope[0][positions].unsqueeze(1), cache.rope[1][positions].unsqueeze(1)  # (B | 1, 1, T, hs)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, h, T, hs) queries or keys: pairs (i, i + hs/2) turn by their position's angle."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` (same parameters and keys) that runs as one native call in CPU inference: 4.7 us
    against `F.rms_norm`'s 12.6 at SmolLM2's batch-16 decode shape (benchmarks/bench_native.py)."""

    fused = True  # see `GPT.fused_training`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and self.training and torch.is_grad_enabled() and self.weight is not None:
            return fused.rms_norm(x, self.weight, self.eps or torch.finfo(x.dtype).eps)
        kernels = native.for_inference(x)
        if kernels is None or self.weight is None or self.eps is None:
            return super().forward(x)
        return kernels.rms_norm(x, self.weight, self.eps)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = (
            config.n_head,
            config.kv_heads,
            config.head_dim,
        )
        width = (self.n_head + 2 * self.n_kv_head) * self.head_dim  # q, k, v at once
        self.c_attn = Linear(config.n_embd, width, bias=config.bias or config.qkv_bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.fused = True  # see `GPT.fused_training`

    def forward(self, x, cache: KVCache | None, layer: int, mask: torch.Tensor | None, rope):
        B, T, C = x.shape
        if cache is not None and T == 1 and not self.training and self._native_cache(cache, layer):
            kernels = native.for_inference(x)
            if kernels is not None:
                return self._decode_natively(kernels, x, cache, layer, rope)
        qkv = self.c_attn(x)  # (B, T, (nh + 2 nkv) hs)
        fused_step = self.dropout == 0.0 and cache is None and mask is None and T > 1 and self._fused_now()
        if rope is not None and fused_step:
            return self._fused_rotary_attention(qkv, rope)
        q = qkv[..., :C].view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        kv = qkv[..., C:].view(B, T, 2, self.n_kv_head, self.head_dim).permute(2, 0, 3, 1, 4)  # (2, B, nkv, T, hs)
        k, v = kv[0], kv[1]
        if rope is not None:  # queries and keys are adjacent in qkv: rotate both in one call, then split
            heads = self.n_head + self.n_kv_head
            qk = qkv[..., : heads * self.head_dim].view(B, T, heads, self.head_dim).transpose(1, 2)
            qk = apply_rotary(qk, *rope)  # (B, nh + nkv, T, hs)
            q, k = qk[:, : self.n_head], qk[:, self.n_head :]
        if cache is not None:
            start, stored = cache.length, cache.kv[layer]
            if rope is None:
                stored[:, :, :, start : start + T] = kv  # keys and values in one copy
            else:
                stored[0, :, :, start : start + T], stored[1, :, :, start : start + T] = k, v
            k, v = stored[0, :, :, : start + T], stored[1, :, :, : start + T]  # (B, nkv, S, hs)
        dropout = self.dropout if self.training else 0.0
        if fused_step:  # learned positions (GPT-2)
            y = fused.causal_attention(q, k, v)  # (B, nh, T, hs)
            return self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        # Without a mask this is training or a prefill from position 0: the fused causal path. A single
        # new token attends to every cached key (causality holds trivially); `mask` drops padding.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=mask is None and T > 1,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    def _fused_now(self) -> bool:
        return self.fused and self.training and torch.is_grad_enabled()

    def _fused_rotary_attention(self, qkv: torch.Tensor, rope) -> torch.Tensor:
        """The training path of `forward` with rotary positions, the same maths. Splitting qkv (rather
        than slicing it) makes its gradient one concatenation instead of zero-filled (B, T, width)
        tensors summed, one per slice."""
        B, T, _ = qkv.shape
        heads, hs = self.n_head + self.n_kv_head, self.head_dim
        qk, v = qkv.split([heads * hs, self.n_kv_head * hs], dim=-1)
        qk = fused.rotary(qk.view(B, T, heads, hs).transpose(1, 2), *rope)  # (B, nh + nkv, T, hs)
        q, k = qk.split([self.n_head, self.n_kv_head], dim=1)
        y = fused.causal_attention(q, k, v.view(B, T, self.n_kv_head, hs).transpose(1, 2))  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, self.n_head * hs))

    @staticmethod
    def _native_cache(cache: KVCache, layer: int) -> bool:
        kv = cache.kv[layer]
        return kv.dtype == torch.float32 and kv.is_contiguous() and cache.valid.is_contiguous()

    def _decode_natively(self, kernels: native.Kernels, x, cache: KVCache, layer: int, rope) -> torch.Tensor:
        """The path above for one new token per row, in two native calls: rotary positions and cache
        append, then attention over the cache. The same maths, mask included: `GPT._attention_mask`
        has written this step's padding into `cache.valid`, and a token always sees itself."""
        B, _, C = x.shape
        qkv = self.c_attn(x).reshape(B, -1).contiguous()  # (B, (nh + 2 nkv) hs), a fresh tensor
        kv = cache.kv[layer]  # (2, B, nkv, capacity, hs)
        kernels.rope_append(qkv, rope, kv, cache.length)
        y = kernels.decode_attention(qkv, kv, cache.valid if cache.padded else None, cache.length + 1)  # (B, C)
        return self.c_proj(y.view(B, 1, C))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gated = config.mlp == "swiglu"
        hidden = config.ffn_size
        # SwiGLU: gate and up projections fused, (C) -> (2 * hidden), gate first.
        self.c_fc = Linear(config.n_embd, 2 * hidden if self.gated else hidden, bias=config.bias)
        self.c_proj = Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.fused = True  # see `GPT.fused_training`

    def forward(self, x):
        h = self.c_fc(x)
        if not self.gated:
            h = F.gelu(h, approximate="tanh")
        elif self.fused and self.training and torch.is_grad_enabled():
            h = fused.swiglu(h)
        elif (kernels := native.for_inference(h)) is not None:
            h = kernels.silu_mul(h)  # one call, not chunk, silu and mul
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        h = self.c_proj(h)
        return self.dropout(h) if self.training else h  # Dropout is the identity in eval: skip the call


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, cache, layer, mask, rope):
        x = x + self.attn(self.ln_1(x), cache, layer, mask, rope)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """`fused_training` (default True): while training with gradients on, RMSNorm, rotary positions,
    attention, SwiGLU and the output layer with its loss run as the functions of `aigc.models.fused`
    (same maths, less time and memory); `set_fused_training(False)` gives the plain PyTorch
    formulation (tests compare the two)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        assert config.kind == "gpt"
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.positions == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = make_norm(config)
        self.fused_training = True
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017)
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layer) so the residual stream stays O(1).
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_cache(self, batch_size: int, device=None, dtype: torch.dtype | None = None) -> KVCache:
        weight = self.ln_f.weight  # not wte's: a quantised run's embedding holds blocks, not floats
        return KVCache(self.config, batch_size, device or weight.device, dtype or weight.dtype)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        pad_mask: torch.Tensor | None = None,
        last_only: bool = False,
        return_logits: bool = True,
    ):
        """idx (B, T) token ids -> logits (B, T, V), loss (mean cross-entropy) if targets are given.

        cache: decode incrementally; the new tokens are appended after `cache.length`.
        positions (B, T): position ids (default: consecutive from `cache.length`).
        pad_mask (B, T): True for real tokens; padding is never attended to.
        last_only: logits (B, 1, V) of the last position only (a prefill needs no more); no loss.
        return_logits: False lets a training step (train mode, gradients on, `fused_training`) skip
        the (B, T, V) logits: None is returned in their place and the loss comes from
        `fused.linear_cross_entropy`, chunk by chunk. Elsewhere the logits are returned anyway.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        if last_only and targets is not None:
            raise ValueError("last_only=True computes no loss; pass targets with last_only=False")
        if cache is not None:
            cache.reserve(start + T)
        if positions is None:
            positions = torch.arange(start, start + T, device=idx.device).unsqueeze(0)  # (1, T)
        mask = self._attention_mask(cache, start, T, pad_mask, idx.device)
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.config.positions == "learned":
            x = x + self.wpe(positions)
        elif cache is not None:
            rope = cached_rotary_tables(cache, positions, self.config, x.dtype)
        else:
            rope = rotary_tables(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        if self.training:  # Dropout is the identity in eval: skip the call
            x = self.drop(x)
        for layer, block in enumerate(self.h):
            x = block(x, cache, layer, mask, rope)
        if cache is not None:
            cache.length = start + T
        x = self.ln_f(x[:, -1:] if last_only else x)
        if targets is not None and not return_logits and self._fused_now():
            head = self.lm_head
            parts = getattr(head, "weight_parts", None)  # a grown or quantised output layer
            weights = parts(fused.compute_dtype(x)) if parts is not None else (head.weight,)
            return None, fused.linear_cross_entropy(x.reshape(B * T, -1), weights, targets.reshape(-1))
        logits = self.lm_head(x)  # (B, T | 1, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def _fused_now(self) -> bool:
        return self.fused_training and self.training and torch.is_grad_enabled()

    def set_fused_training(self, enabled: bool) -> None:
        """Use the fused training functions (True, the default) or the plain PyTorch ones."""
        self.fused_training = enabled
        for module in self.modules():
            if isinstance(module, (CausalSelfAttention, MLP, RMSNorm)):
                module.fused = enabled

    @staticmethod
    def _attention_mask(cache, start, T, pad_mask, device) -> torch.Tensor | None:
        """Boolean (B, 1, T, S) mask (True = may attend), or None when plain causal attention suffices."""
        if cache is not None:
            if pad_mask is not None:
                cache.valid[:, start : start + T] = pad_mask
                cache.padded = cache.padded or not bool(pad_mask.all())
            has_padding = cache.padded
        else:
            has_padding = pad_mask is not None and not bool(pad_mask.all())
        # SDPA's is_causal aligns the top-left corner, which is only right when the query block
        # starts at position 0; a multi-token chunk after cached tokens needs an explicit mask.
        if not has_padding and (start == 0 or T == 1):
            return None
        S = start + T
        if cache is not None and T == 1 and pad_mask is None:
            # One new (real) token after the cache: it may see every valid cached key. A view, no copy.
            return cache.valid[:, None, None, :S]  # (B, 1, 1, S)
        if cache is not None:
            key_valid = cache.valid[:, :S]  # (B, S)
        elif pad_mask is not None:
            key_valid = pad_mask
        else:
            key_valid = torch.ones(1, S, dtype=torch.bool, device=device)
        query_pos = torch.arange(start, S, device=device).unsqueeze(1)  # (T, 1)
        key_pos = torch.arange(S, device=device).unsqueeze(0)  # (1, S)
        causal = key_pos <= query_pos  # (T, S)
        # A padding query may have no valid key at all; letting every query see itself keeps the
        # softmax finite (its output is ignored anyway).
        mask = (causal.unsqueeze(0) & key_valid.unsqueeze(1)) | (key_pos == query_pos).unsqueeze(0)
        return mask.unsqueeze(1)  # (B, 1, T, S)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters (tied weights once); non_embedding leaves out wte, wpe and an untied lm_head."""
        named = list(self.named_parameters())  # a tied lm_head.weight appears once, as wte.weight
        tables = ("wte.weight", "wpe.weight", "lm_head.weight")
        return sum(p.numel() for name, p in named if not (non_embedding and name in tables))

    def flops_per_token(self, training: bool = True) -> float:
        """Matmul FLOPs per token (PaLM appendix B): 6N + 12·L·C·T for training, a third for inference."""
        c = self.config
        flops = 6 * self.num_params(non_embedding=True) + 6 * c.vocab_size * c.n_embd
        flops += 12 * c.n_layer * c.n_embd * c.block_size
        return flops if training else flops / 3
