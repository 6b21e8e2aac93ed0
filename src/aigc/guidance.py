"""Classifier-free guidance for the decode loop (Sanchez et al. 2023, "Stay on topic with
Classifier-Free Guidance"; `guidance_scale` + `negative_prompt_ids` in Hugging Face `generate`).

A guided row is decoded twice: from its own context and from a negative one (`<|endoftext|>`, an
optional label token, an optional negative prompt), both followed by the same generated tokens. Its
next-token scores become

    log p(x | context) + (scale - 1) * (log p(x | context) - log p(x | negative))

so scale 1 is plain sampling, and larger scales push the text towards what the context makes more
likely than the negative does. Use: the opposite sentiment's prompt as the negative steers a review's
sentiment far harder than a control token learned in a few minutes (docs/generate.md has figures).
The cost is one more batch row per guided request.

`GuidedBackend` wraps a decode back-end (`prefill` / `step` / `keep`) and appends the negative rows
after the requests' rows, so the loop and the samplers never see them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def guided_scores(logits: torch.Tensor, negative: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """logits, negative (G, V) raw scores of the same rows; scale (G, 1) -> guided scores (G, V)."""
    conditional = logits.float().log_softmax(dim=-1)
    return conditional + (scale - 1.0) * (conditional - negative.float().log_softmax(dim=-1))


@dataclass
class NegativeRow:
    """A guided row's negative context: `prefix` (<|endoftext|>, label token) never slides out of the
    window; then the negative prompt, then `generated`, the row's own list of generated tokens (the
    same list object, so it grows with the row)."""

    prefix: list[int]
    prompt: list[int]
    generated: list[int]

    def window(self, limit: int) -> list[int]:
        room = limit - len(self.prefix)
        return self.prefix + ((self.prompt + self.generated)[-room:] if room > 0 else [])


class GuidedBackend:
    """A decode back-end whose batch also holds a negative row for each guided row, after the
    requests' rows. `negatives[i]` is row i's NegativeRow or None (unguided), `scales[i]` its scale;
    `limit` the model's context (None: unlimited)."""

    def __init__(self, inner, negatives: list[NegativeRow | None], scales: list[float], limit: int | None):
        self.inner, self.limit = inner, limit
        self.guided = [i for i, negative in enumerate(negatives) if negative is not None]  # among request rows
        self.negatives = [negatives[i] for i in self.guided]
        self.scales = [scales[i] for i in self.guided]
        self.rows = len(negatives)  # request rows in the batch; the negative rows follow them

    def prefill(self, contexts: list[list[int]]) -> torch.Tensor:
        """The requests' contexts (B of them) -> their guided next scores (B, V)."""
        negative = [n.window(self.limit) if self.limit else n.prefix + n.prompt + n.generated for n in self.negatives]
        self.rows = len(contexts)
        return self._combine(self.inner.prefill(contexts + negative))

    def step(self, tokens: torch.Tensor, rows: list) -> torch.Tensor:
        """tokens (B, 1) of the requests' rows -> their guided next scores (B, V)."""
        both = torch.cat((tokens, tokens[self.guided])) if self.guided else tokens  # (B + G, 1)
        return self._combine(self.inner.step(both, rows + self.negatives))

    def keep(self, index: torch.Tensor) -> None:
        """Keep the request rows in `index` (and the negative rows of the guided ones among them)."""
        kept = index.tolist()
        still = [g for g, row in enumerate(self.guided) if row in kept]  # positions among the negatives
        negative_index = torch.tensor([self.rows + g for g in still], dtype=index.dtype, device=index.device)
        self.inner.keep(torch.cat((index, negative_index)))
        self.guided = [kept.index(self.guided[g]) for g in still]
        self.negatives = [self.negatives[g] for g in still]
        self.scales = [self.scales[g] for g in still]
        self.rows = len(kept)

    def _combine(self, logits: torch.Tensor) -> torch.Tensor:
        """(B + G, V) raw scores -> (B, V), the guided rows' scores replaced by `guided_scores`."""
        if not self.guided:
            return logits
        out = logits[: self.rows].float().clone()  # (B, V)
        index = torch.tensor(self.guided, device=logits.device)
        scale = torch.tensor(self.scales, device=logits.device).unsqueeze(1)  # (G, 1)
        out[index] = guided_scores(logits[index], logits[self.rows :], scale)
        return out
