"""Decoder-only transformer with exactly the GPT-2 architecture.

Pre-norm blocks, learned absolute positions, tanh-GELU MLP, biases, tied input/output embeddings
(Radford et al. 2019). We chose learned positions over rotary so that a run exports to a
`transformers` GPT2LMHeadModel with no conversion of the maths, and vLLM/TGI can serve it as-is.

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
from aigc.models.packed import PackedLinear


def _run(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` without nn.Module's call machinery for a plain Linear, LayerNorm or Embedding.

    A decode step of a small model makes about 20 such calls, each paying a few microseconds of hook
    handling for nothing. Anything else (a LoRA or int8 layer, say) is called normally.
    """
    kind = type(module)
    if kind is nn.Linear:
        return F.linear(x, module.weight, module.bias)
    if kind is nn.LayerNorm:
        return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)
    if kind is nn.Embedding and module.max_norm is None:
        return F.embedding(x, module.weight, module.padding_idx, None, 2.0, module.scale_grad_by_freq, module.sparse)
    return module(x)


class KVCache:
    """Keys/values of every layer for the tokens seen so far; filled in place by `GPT.forward`.

    One preallocated (2, B, nh, block_size, hs) tensor per layer holds keys then values, so a decode
    step writes both with a single copy and never concatenates.
    """

    def __init__(self, config: ModelConfig, batch_size: int, device, dtype: torch.dtype):
        head_dim = config.n_embd // config.n_head
        shape = (2, batch_size, config.n_head, config.block_size, head_dim)
        self.kv = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        # True where a cached position holds a real (non-padding) token.   # (B, block_size)
        self.valid = torch.ones(batch_size, config.block_size, device=device, dtype=torch.bool)
        self.head = PackedLinear()  # the output layer packed for this session's fixed weights
        # Whether any cached position is padding: tracked in Python so a decode step needs no device sync.
        self.padded = False
        self.length = 0
        self.capacity = config.block_size

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (e.g. drop finished sequences)."""
        self.kv = [kv[:, index] for kv in self.kv]
        self.valid = self.valid[index]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x, cache: KVCache | None, layer: int, mask: torch.Tensor | None):
        B, T, C = x.shape
        if cache is not None and T == 1:
            return self._decode_step(x, cache, layer, mask)
        # (B, T, 3C) -> (3, B, nh, T, hs): q, k and v with heads split out, as views.
        qkv = _run(self.c_attn, x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if cache is not None:
            start, stored = cache.length, cache.kv[layer]
            stored[:, :, :, start : start + T] = qkv[1:]  # keys and values in one copy
            k, v = stored[0, :, :, : start + T], stored[1, :, :, : start + T]  # (B, nh, S, hs), S = tokens so far
        dropout = self.dropout if self.training else 0.0
        if mask is None:
            # Training / plain prefill: pure causal attention, the fast fused path.
            # With a cache and no mask this is a prefill from position 0.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, T, C)  # re-assemble heads: (B, T, C)
        return _run(self.c_proj, y)

    def _decode_step(self, x, cache: KVCache, layer: int, mask: torch.Tensor | None):
        """One new token per row, the bulk of generation: the same maths with fewer view ops."""
        B, _, C = x.shape
        heads = _run(self.c_attn, x).view(B, 3, self.n_head, C // self.n_head)  # (B, 3, nh, hs)
        start, stored = cache.length, cache.kv[layer]
        stored[:, :, :, start] = heads[:, 1:].transpose(0, 1)  # keys and values in one copy
        k, v = stored[0, :, :, : start + 1], stored[1, :, :, : start + 1]  # (B, nh, S, hs)
        # A single query attends to every cached key (causality holds trivially); `mask` drops padding.
        y = F.scaled_dot_product_attention(heads[:, 0].unsqueeze(2), k, v, attn_mask=mask)  # (B, nh, 1, hs)
        return _run(self.c_proj, y.reshape(B, 1, C))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = _run(self.c_proj, F.gelu(_run(self.c_fc, x), approximate="tanh"))
        return self.dropout(x) if self.training else x  # skipping the no-op call saves time per decode step


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache, layer, mask):
        x = x + self.attn(_run(self.ln_1, x), cache, layer, mask)
        return x + self.mlp(_run(self.ln_2, x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        assert config.kind == "gpt"
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
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
        weight = self.wte.weight
        return KVCache(self.config, batch_size, device or weight.device, dtype or weight.dtype)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        pad_mask: torch.Tensor | None = None,
    ):
        """idx (B, T) token ids -> logits (B, T, V), loss (mean cross-entropy) if targets are given.

        cache: decode incrementally; the new tokens are appended after `cache.length`.
        positions (B, T): position ids (default: consecutive from `cache.length`).
        pad_mask (B, T): True for real tokens; padding is never attended to.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        if positions is None:
            positions = torch.arange(start, start + T, device=idx.device).unsqueeze(0)  # (1, T)
        mask = self._attention_mask(cache, start, T, pad_mask, idx.device)
        x = _run(self.wte, idx) + _run(self.wpe, positions)  # (B, T, C)
        if self.training:
            x = self.drop(x)
        for layer, block in enumerate(self.h):
            x = block(x, cache, layer, mask)
        x = _run(self.ln_f, x)
        if cache is not None:
            cache.length = start + T
        logits = self._project(x, cache)  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def _project(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """Hidden states (B, T, C) -> logits (B, T, V). While decoding on the CPU, the head runs from
        the cache's packed copy of its weight (aigc.models.packed: the biggest product of a step)."""
        if cache is not None and type(self.lm_head) is nn.Linear:
            logits = cache.head(self.lm_head, x)
            if logits is not None:
                return logits
        return _run(self.lm_head, x)

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
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() - self.wte.weight.numel() if non_embedding else n

    def flops_per_token(self, training: bool = True) -> float:
        """Matmul FLOPs per token (PaLM appendix B): 6N + 12·L·C·T for training, a third for inference."""
        c = self.config
        flops = 6 * self.num_params(non_embedding=True) + 6 * c.vocab_size * c.n_embd
        flops += 12 * c.n_layer * c.n_embd * c.block_size
        return flops if training else flops / 3
