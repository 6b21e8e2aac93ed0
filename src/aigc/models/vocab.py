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

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from aigc.errors import AigcError
from aigc.models.packed import Linear
from aigc.models.qlayers import QuantEmbedding, QuantLinear
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

    @property
    def num_embeddings(self) -> int:
        return self.base_size + self.new_rows.shape[0]

    def full_weight(self) -> torch.Tensor:
        return torch.cat((self.weight, self.new_rows))  # (V + n, C)


class GrownQuantEmbedding(GrownEmbedding):
    """`GrownEmbedding` over a block-quantised table (V, C), held as the module `base`."""

    def __init__(self, base: QuantEmbedding, new_rows: torch.Tensor):
        nn.Module.__init__(self)
        self.base = base
        self.new_rows = nn.Parameter(new_rows.float())  # (n, C)
        self.base_size = base.num_embeddings

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.base(idx.clamp(max=self.base_size - 1))  # (B, T, C) in the table's dtype, no grad
        new = F.embedding((idx - self.base_size).clamp(min=0), self.new_rows)  # (B, T, C)
        return torch.where((idx >= self.base_size).unsqueeze(-1), new.to(x.dtype), x)

    def full_weight(self) -> torch.Tensor:
        return torch.cat((self.base.dequantized(), self.new_rows))  # (V + n, C)


class GrownHead(nn.Module):
    """Output layer over the grown vocabulary: logits (..., V + n) from the frozen (V, C) weight and the
    new rows (shared with the embedding when tied)."""

    def __init__(self, weight: nn.Parameter, new_rows: nn.Parameter):
        super().__init__()
        self.weight, self.new_rows = weight, new_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((F.linear(x, self.weight), F.linear(x, self.new_rows.to(x.dtype))), dim=-1)

    def weight_parts(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The output layer's rows in two parts, for a loss that takes them apart (no concatenation)."""
        return self.weight, self.new_rows


class GrownQuantHead(GrownHead):
    """`GrownHead` over a block-quantised output layer, held as the module `base`."""

    def __init__(self, base: QuantLinear, new_rows: nn.Parameter):
        nn.Module.__init__(self)
        self.base, self.new_rows = base, new_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base(x)  # (..., V)
        return torch.cat((base, F.linear(x.to(base.dtype), self.new_rows.to(base.dtype))), dim=-1)

    def weight_parts(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The base rows expanded in `dtype` for this step (frozen), and the new rows."""
        return self.base.dequantized(dtype), self.new_rows


def initial_rows(table: torch.Tensor | nn.Module, tokenizer: Tokenizer, new_ids: range) -> torch.Tensor:
    """(n, C) starting rows for the ids `new_ids`: the mean of the rows of the label's word, else of all.
    `table`: the (V, C) weight, or an embedding module (a quantised one expands only the rows it reads)."""
    lookup = table if isinstance(table, nn.Module) else (lambda ids: table[ids])
    size = table.num_embeddings if isinstance(table, nn.Module) else len(table)
    rows = []
    with torch.no_grad():
        for token_id in new_ids:
            label = next((lb for lb in tokenizer.labels if tokenizer.label_id(lb) == token_id), None)
            ids = [i for i in tokenizer.encode(" " + label) if i < size] if label else []
            rows.append(lookup(torch.tensor(ids)).float().mean(0) if ids else _mean_row(lookup, size))
    return torch.stack(rows).detach().clone()


def _mean_row(lookup, size: int, chunk: int = 4096) -> torch.Tensor:
    """The mean of all `size` rows, read `chunk` rows at a time (a quantised table is never expanded whole)."""
    sums = (lookup(torch.arange(start, min(start + chunk, size))).double().sum(0) for start in range(0, size, chunk))
    return (sum(sums) / size).float()


def grow_to(model: nn.Module, tokenizer: Tokenizer, vocab_size: int, frozen: bool) -> nn.Module:
    """Grow a GPT's vocabulary to `vocab_size` in place (no change if it is that large already): the
    rows of ids [current size, vocab_size) start from their label's word. `frozen`: `grow_frozen` (LoRA)."""
    old = model.wte.num_embeddings
    if vocab_size > old:
        rows = initial_rows(model.wte, tokenizer, range(old, vocab_size))
        (grow_frozen if frozen else grow)(model, rows)
    return model


def _check_gpt(model: nn.Module) -> None:
    if not isinstance(getattr(model, "wte", None), (nn.Embedding, QuantEmbedding)) or not hasattr(model, "lm_head"):
        raise AigcError("only a GPT's vocabulary can grow (new label tokens); fine-tune a GPT or drop the labels")


def grow_frozen(model: nn.Module, wte_rows: torch.Tensor, head_rows: torch.Tensor | None = None) -> nn.Module:
    """Add trainable rows to a frozen model's vocabulary, in place (LoRA training). `head_rows` (n, C)
    only for an untied output layer (default: the embedding's rows)."""
    _check_gpt(model)
    if isinstance(model.wte, QuantEmbedding):
        return _grow_quantised(model, wte_rows, head_rows)
    tied = model.lm_head.weight is model.wte.weight
    model.wte = GrownEmbedding(model.wte, wte_rows)
    head_new = model.wte.new_rows if tied else nn.Parameter(wte_rows.clone() if head_rows is None else head_rows)
    model.lm_head.weight.requires_grad_(False)
    model.lm_head = GrownHead(model.lm_head.weight, head_new)
    return _resized(model)


def _grow_quantised(model: nn.Module, wte_rows: torch.Tensor, head_rows: torch.Tensor | None) -> nn.Module:
    tied = model.lm_head.shares_blocks(model.wte)
    model.wte = GrownQuantEmbedding(model.wte, wte_rows)
    head_new = model.wte.new_rows if tied else nn.Parameter((wte_rows if head_rows is None else head_rows).float())
    model.lm_head = GrownQuantHead(model.lm_head, head_new)
    return _resized(model)


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
    return _resized(model)


def _resized(model: nn.Module) -> nn.Module:
    """Record the grown vocabulary in the model's config, which exporters read (GGUF's vocabulary)."""
    model.config = dataclasses.replace(model.config, vocab_size=model.wte.num_embeddings)
    return model


def fold(model: nn.Module) -> nn.Module:
    """Turn `grow_frozen`'s modules back into a plain embedding and output layer, in place (a quantised
    table expanded to float32)."""
    if isinstance(model.wte, GrownEmbedding):
        wte, head = model.wte, model.lm_head
        tied = head.new_rows is wte.new_rows
        base_table = _table(wte)
        base_wte, base_head = nn.Embedding.from_pretrained(base_table), nn.Linear(1, 1, bias=False)
        if not tied:
            base_head.weight = nn.Parameter(_table(head), requires_grad=False)
        model.wte, model.lm_head = base_wte, base_head
        if tied:
            model.lm_head.weight = model.wte.weight
        grow(model, wte.new_rows.detach(), None if tied else head.new_rows.detach())
    return model


def _table(grown: nn.Module) -> torch.Tensor:
    """The frozen base rows (V, C) of a grown embedding or output layer, float32 if quantised."""
    if isinstance(grown, (GrownQuantEmbedding, GrownQuantHead)):
        return grown.base.dequantized()
    return grown.weight.detach()
