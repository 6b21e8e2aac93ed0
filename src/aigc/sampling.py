"""Sampling: pure functions over a batch of logits, and the per-row sampling state of a decode.

Logits are (B, V) float; per-row options are (B, 1) or (B,) tensors. `Sampler` turns each row's
`SampleConfig` into such tensors and applies, in order: banned tokens (padding, label control tokens,
end-of-text before `min_new_tokens`), repetition penalty, top-k, top-p, then greedy or seeded
inverse-CDF sampling. Each row draws from its own seeded generator on the CPU, so a seed gives the
same text whatever else is in the batch and on every device.
"""

from __future__ import annotations

import random

import torch

from aigc.config import SampleConfig
from aigc.tokenizer import Tokenizer

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------
# Pure sampling functions. logits (B, V) float; per-row options as (B, 1) or (B,) tensors.
# ---------------------------------------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Make already-seen tokens less likely (Keskar et al. 2019): positive logits are divided by the
    penalty, negative ones multiplied, so the penalty always lowers them. seen (B, V) bool, penalty (B, 1)."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_allowed(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Constrained decoding: only tokens a row's grammar allows stay possible. allowed (B, V) bool."""
    return logits.masked_fill(~allowed, NEG_INF)


def apply_top_k(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep the k largest logits of each row (k (B,) long; 0 = keep all)."""
    vocab = logits.size(-1)
    k = torch.where(k > 0, k, vocab).clamp(max=vocab)
    top = torch.topk(logits, int(k.max()), dim=-1).values  # (B, kmax), descending
    kth = top.gather(1, (k - 1).unsqueeze(1))  # (B, 1): the k-th largest logit
    return logits.masked_fill(logits < kth, NEG_INF)


def apply_top_p(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of most likely tokens whose
    probability reaches p (B, 1); the most likely token always stays."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V) probability of all better tokens
    drop_sorted = mass_before >= p
    drop_sorted[:, 0] = False  # even when p rounds to 0 in float32 (p = 1e-46): never an empty row
    drop = torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, NEG_INF)


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Pick one token per row: argmax where temperature is 0, else inverse-CDF sampling from
    softmax(logits / temperature) with the row's uniform draw in [0, 1). Returns (B,) long."""
    greedy = logits.argmax(dim=-1)
    scale = torch.where(temperature > 0, temperature, 1.0)  # (B, 1)
    # Shift the best logit to 0 before dividing: logits / a tiny temperature would overflow to inf
    # (inf - inf = NaN in the softmax); shifted values only run towards -inf, whose exp is 0.
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    probs = (shifted / scale).softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)  # (B, V)
    target = (uniforms.unsqueeze(1) * cdf[:, -1:]).contiguous()  # (B, 1)
    sampled = torch.searchsorted(cdf, target, right=True).squeeze(1)  # (B,) first index with cdf > target
    # u * total can round up to the total itself (u = 1 - 2**-24): then no index qualifies, and the
    # answer must be the last token with any probability, not the last of the vocabulary.
    last_kept = logits.size(-1) - 1 - (probs.flip(-1) > 0).int().argmax(dim=-1)  # (B,)
    sampled = torch.minimum(sampled, last_kept)
    return torch.where(temperature.squeeze(1) > 0, sampled, greedy)


# ---------------------------------------------------------------------------------------------
# Per-row sampling state
# ---------------------------------------------------------------------------------------------


class Sampler:
    """The sampling options of every active row as tensors, plus each row's random generator."""

    def __init__(
        self, configs: list[SampleConfig], contexts: list[list[int]], tokenizer: Tokenizer, vocab: int, device
    ):
        """contexts: the tokens each row has seen so far (for the repetition penalty)."""

        def column(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        self.temperature = column([[c.temperature] for c in configs], torch.float32)  # (B, 1)
        self.top_k = column([c.top_k for c in configs], torch.long)  # (B,)
        self.top_p = column([[c.top_p] for c in configs], torch.float32)  # (B, 1)
        self.penalty = column([[c.repetition_penalty] for c in configs], torch.float32)  # (B, 1)
        self.min_new = column([c.min_new_tokens for c in configs], torch.long)  # (B,)
        self.configs = configs
        self.generators = [_row_generator(c.seed) for c in configs]
        self.eot = tokenizer.eot_id
        # Padding and label control tokens never belong in generated text: -inf added to their logits.
        banned = [tokenizer.pad_id] + [tokenizer.label_id(label) for label in tokenizer.labels]
        self.ban = torch.zeros(vocab, device=device)  # (V,)
        self.ban[[i for i in banned if i < vocab]] = NEG_INF
        self.ban_and_eot = self.ban.clone()  # while every row is below its min_new_tokens
        self.ban_and_eot[self.eot] = NEG_INF
        self.seen = None
        if any(c.repetition_penalty != 1.0 for c in configs):
            self.seen = torch.zeros(len(configs), vocab, dtype=torch.bool, device=device)
            for r, context in enumerate(contexts):
                self.seen[r, torch.tensor(context, dtype=torch.long, device=device)] = True
        self._summarise()

    def _summarise(self) -> None:
        """Which processing steps any active row needs (checked in Python: no device sync per step)."""
        sampling = [c for c in self.configs if c.temperature > 0]
        self.sampling = [c.temperature > 0 for c in self.configs]
        self.any_top_k = any(c.top_k > 0 for c in sampling)
        self.any_top_p = any(c.top_p < 1.0 for c in sampling)
        self.most_min_new = max(c.min_new_tokens for c in self.configs)
        self.least_min_new = min(c.min_new_tokens for c in self.configs)

    def keep(self, index: torch.Tensor, kept: list[int]) -> None:
        for name in ("temperature", "top_k", "top_p", "penalty", "min_new", "seen"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[index])
        self.configs = [self.configs[i] for i in kept]
        self.generators = [self.generators[i] for i in kept]
        self._summarise()

    def pick(self, raw: torch.Tensor, step: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """raw (B, V) logits -> the chosen token of each row (B,). allowed (B, V) bool: the tokens each
        row's grammar permits (None: no row is constrained); applied before the penalty, top-k and top-p,
        so those choose among permitted tokens only."""
        # A new (B, V) tensor: `raw` stays intact for the logprobs.
        logits = raw.float() + (self.ban_and_eot if self.least_min_new > step else self.ban)
        if self.least_min_new <= step < self.most_min_new:  # only some rows still suppress end-of-text
            logits[:, self.eot] = logits[:, self.eot].masked_fill(self.min_new > step, NEG_INF)
        if allowed is not None:
            logits = apply_allowed(logits, allowed.to(logits.device))
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, self.penalty)
        if self.any_top_k:
            logits = apply_top_k(logits, self.top_k)
        if self.any_top_p:
            logits = apply_top_p(logits, self.top_p)
        if any(self.sampling):
            draws = zip(self.sampling, self.generators)
            uniforms = [float(torch.rand((), generator=g)) if s else 0.0 for s, g in draws]
            tokens = sample_tokens(logits, self.temperature, torch.tensor(uniforms, device=raw.device))
        else:
            tokens = logits.argmax(dim=-1)  # all greedy: skip the softmax and cumulative sums
        if self.seen is not None:
            self.seen[torch.arange(len(tokens), device=raw.device), tokens] = True
        return tokens


def _row_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()  # on the CPU: a seed gives the same draws on every device
    generator.manual_seed(seed if seed is not None else random.SystemRandom().randrange(2**63))
    return generator
