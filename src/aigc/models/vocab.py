"""A pretrained GPT's vocabulary grown by a few tokens (the control tokens `<|pos|>` of labels).

`aigc prepare --tokenizer BASE` appends the tokens after the base's last id, so the grown model is the
base with new rows at the end of its token embedding (and of the tied output layer). A new row starts
as the mean of the rows of its label's own word (`<|pos|>` from " pos"), so the model reads it as
something related from the first step; a token with no such word starts at the mean of all rows.

Under LoRA the base table stays frozen and only the new rows train: `GrownEmbedding` and `GrownHead`
hold the base weight (V, C), frozen, and the rows (n, C) as a parameter of their own, so backward never
forms the (V, C) gradient of the table. Full fine-tuning grows a plain `nn.Embedding` instead (`grow`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from aigc.errors import AigcError
from aigc.models.packed import Linear
from aigc.tokenizer import Tokenizer

NEW_ROWS = "new_rows"  # parameter name of the added rows: `wte.new_rows`, `lm_head.new_rows` if untied


class GrownEmbedding(nn.Module):
    """Token embedding = frozen base rows (V, C) followed by trainable new rows (n, C)."""

    def __init__(self, base: nn.Embedding, new_rows: torch.Tensor):
        super().__init__()
        self.weight = base.weight  # (V, C), frozen; named `weight` like nn.Embedding's
        self.weight.requires_grad_(False)
        self.new_rows = nn.Parameter(new_rows.to(base.weight))  # (n, C)
        self.base_size = base.num_embeddings

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = F.embedding(idx.clamp(max=self.base_size - 1), self.weight)  # (B, T, C), no grad
        new = F.embedding((idx - self.base_size).clamp(min=0), self.new_rows)  # (B, T, C)
        return torch.where((idx >= self.base_size).unsqueeze(-1), new.to(x.dtype), x)  # in the base's dtype

    def full_weight(self) -> torch.Tensor:
        return torch.cat((self.weight, self.new_rows))  # (V + n, C)


class GrownHead(nn.Module):
    """Output layer over the grown vocabulary: logits (..., V + n) from the frozen (V, C) weight and the
    new rows (shared with the embedding when tied)."""

    def __init__(self, weight: nn.Parameter, new_rows: nn.Parameter):
        super().__init__()
        self.weight, self.new_rows = weight, new_rows
        self._joined: tuple[tuple, torch.Tensor] | None = None  # see `joined`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((F.linear(x, self.weight), F.linear(x, self.new_rows.to(x.dtype))), dim=-1)

    def weight_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The output layer's rows in two parts, for a loss that takes them apart (no concatenation)."""
        return self.weight, self.new_rows

    @torch.no_grad()
    def joined(self, dtype: torch.dtype) -> torch.Tensor:
        """cat(weight, new_rows) (V + n, C) in `dtype`, kept between calls: the frozen (V, C) part is copied
        once (again only if it changes), the few new rows on each call. Concatenating SmolLM2's 49,152 rows
        anew took 35 ms a step (bf16, one thread, 2-core Xeon), mostly the fresh 57 MB's page faults."""
        key = (self.weight.data_ptr(), self.weight._version, dtype, self.weight.device)
        if self._joined is None or self._joined[0] != key:
            table = torch.empty(
                len(self.weight) + len(self.new_rows), self.weight.shape[1], dtype=dtype, device=self.weight.device
            )
            table[: len(self.weight)] = self.weight
            self._joined = key, table
        table = self._joined[1]
        table[len(self.weight) :] = self.new_rows
        return table


def initial_rows(weight: torch.Tensor, tokenizer: Tokenizer, new_ids: range) -> torch.Tensor:
    """(n, C) starting rows for the ids `new_ids`: the mean of the rows of the label's word, else of all."""
    rows = []
    for token_id in new_ids:
        label = next((lb for lb in tokenizer.labels if tokenizer.label_id(lb) == token_id), None)
        ids = [i for i in tokenizer.encode(" " + label) if i < len(weight)] if label else []
        rows.append(weight[ids].mean(0) if ids else weight.mean(0))
    return torch.stack(rows).detach().clone()


def grow_to(model: nn.Module, tokenizer: Tokenizer, vocab_size: int, frozen: bool) -> nn.Module:
    """Grow a GPT's vocabulary to `vocab_size` in place (no change if it is that large already): the
    rows of ids [current size, vocab_size) start from their label's word. `frozen`: `grow_frozen` (LoRA)."""
    old = model.wte.num_embeddings
    if vocab_size > old:
        rows = initial_rows(model.wte.weight, tokenizer, range(old, vocab_size))
        (grow_frozen if frozen else grow)(model, rows)
    return model


def _check_gpt(model: nn.Module) -> None:
    if not isinstance(getattr(model, "wte", None), nn.Embedding) or not hasattr(model, "lm_head"):
        raise AigcError("only a GPT's vocabulary can grow (new label tokens); fine-tune a GPT run or drop the labels")


def grow_frozen(model: nn.Module, wte_rows: torch.Tensor, head_rows: torch.Tensor | None = None) -> nn.Module:
    """Add trainable rows to a frozen model's vocabulary, in place (LoRA training). `head_rows` (n, C)
    only for an untied output layer (default: the embedding's rows)."""
    _check_gpt(model)
    tied = model.lm_head.weight is model.wte.weight
    model.wte = GrownEmbedding(model.wte, wte_rows)
    head_new = model.wte.new_rows if tied else nn.Parameter(wte_rows.clone() if head_rows is None else head_rows)
    model.lm_head.weight.requires_grad_(False)
    model.lm_head = GrownHead(model.lm_head.weight, head_new)
    return model


def grow(model: nn.Module, wte_rows: torch.Tensor, head_rows: torch.Tensor | None = None) -> nn.Module:
    """Append rows to the embedding (and output layer) as plain modules, in place: full fine-tuning, or
    loading a run whose new rows were trained."""
    _check_gpt(model)
    tied = model.lm_head.weight is model.wte.weight
    head_rows = wte_rows if head_rows is None else head_rows
    embedding = torch.cat((model.wte.weight.detach(), wte_rows.to(model.wte.weight)))  # (V + n, C)
    model.wte = nn.Embedding.from_pretrained(embedding, freeze=False)
    head = Linear(embedding.size(1), embedding.size(0), bias=False).to(embedding)
    if tied:
        head.weight = model.wte.weight
    else:
        with torch.no_grad():
            head.weight.copy_(torch.cat((model.lm_head.weight.detach(), head_rows.to(embedding))))
    model.lm_head = head
    return model


def fold(model: nn.Module) -> nn.Module:
    """Turn `grow_frozen`'s modules back into a plain embedding and output layer, in place."""
    if isinstance(model.wte, GrownEmbedding):
        wte, head = model.wte, model.lm_head
        tied = head.new_rows is wte.new_rows
        base_wte, base_head = nn.Embedding.from_pretrained(wte.weight.detach()), nn.Linear(1, 1, bias=False)
        base_head.weight = wte.weight if tied else head.weight
        model.wte, model.lm_head = base_wte, base_head
        if tied:
            model.lm_head.weight = model.wte.weight
        grow(model, wte.new_rows.detach(), None if tied else head.new_rows.detach())
    return model
