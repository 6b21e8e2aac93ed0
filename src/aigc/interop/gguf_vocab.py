"""A run's tokenizer as GGUF metadata (`tokenizer.ggml.*`): the reverse of `gguf_tokenizer.py`.

A GGUF names its word split only by a label (`tokenizer.ggml.pre`), so the run's pre-tokenizer must
be one that a label stands for: the label is found by building each known label's pre-tokenizer
(`gguf_tokenizer.PRE_TOKENIZERS`) and comparing it with the run's, so export and import agree by
construction. Tokens are listed in id order, one per embedding row; rows past the tokenizer's last
id get llama.cpp's unused placeholders (`[PAD<id>]`, type 5), as its converter writes them.

Special tokens, chosen so that llama.cpp starts and stops text as aigc does:
- `bos`/`add_bos`: a BOS the tokenizer itself prepends (from an imported GGUF) is kept. Otherwise
  `<|endoftext|>`, prepended to plain prompts (aigc starts every plain prompt with it, as documents
  were laid out in training) unless the run has a chat template, which then decides how a
  conversation starts (aigc chat adds nothing either).
- `eos`: the token that ends the assistant's turn in the chat template (ChatML: `<|im_end|>`), or
  `<|endoftext|>`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from aigc.chat import ChatTemplate
from aigc.errors import AigcError
from aigc.interop.gguf_tokenizer import CONTROL, PRE_TOKENIZERS, USER_DEFINED
from aigc.tokenizer import Tokenizer

NORMAL, UNUSED = 1, 5  # llama.cpp's token types (gguf.TokenType)


@dataclass(frozen=True)
class GGUFTokenizer:
    """What `tokenizer.ggml.*` (and the chat template) will hold."""

    pre: str
    tokens: list[str]  # one per embedding row, in id order
    token_types: list[int]
    merges: list[str]  # "left right", best first
    bos_id: int
    eos_id: int
    pad_id: int
    add_bos: bool
    chat_template: str | None


def _pre_tokenizer_json(pre_tokenizer) -> dict | None:
    probe = HFTokenizer(models.BPE())
    probe.pre_tokenizer = pre_tokenizer
    return json.loads(probe.to_str())["pre_tokenizer"]


def pre_label(spec: dict) -> str:
    """The `tokenizer.ggml.pre` label whose word split is the tokenizer's (spec: tokenizer.json as a dict)."""
    if spec.get("model", {}).get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise AigcError("GGUF export needs a byte-level BPE tokenizer (as aigc trains and imports)")
    if spec.get("normalizer") is not None:
        raise AigcError("the run's tokenizer normalises text, which a GGUF vocabulary cannot describe")
    for label, build in PRE_TOKENIZERS.items():
        if _pre_tokenizer_json(build()) == spec.get("pre_tokenizer"):
            return label
    kind = (spec.get("pre_tokenizer") or {}).get("type")
    raise AigcError(
        f"the run's tokenizer splits words in a way ({kind}) that no GGUF pre-tokenizer label names; "
        f"GGUF export knows: {', '.join(PRE_TOKENIZERS)}"
    )


def _merges(spec: dict) -> list[str]:
    # tokenizers writes merges as "a b" strings (older files) or [a, b] pairs (newer ones)
    return [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]


def _tokens(hf: HFTokenizer, rows: int) -> tuple[list[str], list[int]]:
    if hf.get_vocab_size(with_added_tokens=True) > rows:
        raise AigcError(f"the tokenizer has more tokens than the model's {rows} embedding rows; the run is damaged")
    added = hf.get_added_tokens_decoder()  # {id: AddedToken}
    tokens, types = [], []
    for index in range(rows):
        token = hf.id_to_token(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
        else:
            tokens.append(token)
            types.append(NORMAL if index not in added else CONTROL if added[index].special else USER_DEFINED)
    return tokens, types


def _prepended_special(spec: dict) -> str | None:
    """The special token the tokenizer's post-processor puts before a text, if any."""
    post = spec.get("post_processor") or {}
    steps = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing" and step.get("single"):
            first = step["single"][0]
            if "SpecialToken" in first:
                return first["SpecialToken"]["id"]
    return None


def vocab_from_run(tokenizer: Tokenizer, rows: int, chat_template: str | None) -> GGUFTokenizer:
    """The GGUF tokenizer metadata of a run's tokenizer, for a model with `rows` embedding rows."""
    spec = json.loads(tokenizer.hf.to_str())
    tokens, types = _tokens(tokenizer.hf, rows)
    prepended = _prepended_special(spec)
    if prepended is not None:
        bos, add_bos = tokenizer.hf.token_to_id(prepended), True
    else:
        bos, add_bos = tokenizer.eot_id, chat_template is None
    eos = tokenizer.eot_id
    if chat_template is not None:
        eos = ChatTemplate(chat_template, origin="of the run").end_of_turn_ids(tokenizer)[0]
    return GGUFTokenizer(
        pre=pre_label(spec),
        tokens=tokens,
        token_types=types,
        merges=_merges(spec),
        bos_id=bos,
        eos_id=eos,
        pad_id=tokenizer.pad_id,
        add_bos=add_bos,
        chat_template=chat_template,
    )
