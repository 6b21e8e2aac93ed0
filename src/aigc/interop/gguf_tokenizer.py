"""Build a Hugging Face `tokenizer.json` from the tokenizer a GGUF file describes in its metadata.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`, in id
order), the BPE merges, a type per token (1 normal, 3 control, 4 user-defined, 6 byte) and the
ids of the special tokens. For a byte-level BPE vocabulary (`tokenizer.ggml.model == "gpt2"`:
GPT-2, Llama 3, Qwen2, SmolLM) that is everything a `tokenizers` BPE model needs; what the file
names only by a label is how text is split into words before BPE (`tokenizer.ggml.pre`), so each
supported label maps to the split llama.cpp applies for it (llama-vocab.cpp).

Control tokens become special added tokens and user-defined ones plain added tokens, so both are
matched whole in text instead of being cut into bytes. SentencePiece vocabularies
(`tokenizer.ggml.model == "llama"`) are not handled yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from aigc.errors import AigcError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types (gguf.TokenType)

# The GPT-2 split is what `ByteLevel(use_regex=True)` applies by itself.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2 differs from Llama 3 only in taking digits one at a time.
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    # StarCoder / SmolLM: every digit is its own word, then the GPT-2 split.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_split()])


def _regex_split(pattern: str):
    def build() -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    return build


# tokenizer.ggml.pre -> the word split. A file without the key predates it and means GPT-2.
PRE_TOKENIZERS = {
    "gpt2": _gpt2_split,
    "smollm": _digits_then_gpt2,
    "starcoder": _digits_then_gpt2,
    "llama-bpe": _regex_split(_LLAMA3_SPLIT),
    "llama3": _regex_split(_LLAMA3_SPLIT),
    "llama-v3": _regex_split(_LLAMA3_SPLIT),
    "qwen2": _regex_split(_QWEN2_SPLIT),
}
TOKENIZER_MODELS = ("gpt2",)


@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer part of a GGUF's metadata, as read from the file."""

    model: str  # tokenizer.ggml.model
    pre: str  # tokenizer.ggml.pre ("gpt2" when absent)
    tokens: Sequence[str]
    token_types: Sequence[int]  # one per token; empty when the file has none
    merges: Sequence[str]  # "left right", best first
    special_ids: dict[str, int]  # "bos"/"eos"/"unk"/"pad" -> id, only those the file names
    add_bos: bool
    add_eos: bool


def _byte_alphabet() -> set[str]:
    return set(pre_tokenizers.ByteLevel.alphabet())


def _vocab(tokens: Sequence[str]) -> dict[str, int]:
    """token -> id, each token spelled in the byte alphabet (llama.cpp writes them so; any that
    is not is respelled). The first id wins when a file lists a token twice."""
    alphabet = _byte_alphabet()
    spell = {b: c for b, c in enumerate(_byte_chars())}
    vocab = {}
    for index, token in enumerate(tokens):
        if not set(token) <= alphabet:
            token = "".join(spell[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)
    return vocab


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255: printable Latin-1 bytes stand for
    themselves, the rest are shifted to code points 256 and up, in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, shifted = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return [chars[b] for b in range(256)]


def _merges(merges: Sequence[str], where: str) -> list[tuple[str, str]]:
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise AigcError(f"{where}: merge {merge!r} is not two tokens separated by one space")
        pairs.append((parts[0], parts[1]))
    return pairs


def _added_tokens(vocab: GGUFVocab, known: dict[str, int]) -> list[AddedToken]:
    """Control tokens as special added tokens, user-defined ones as plain ones; only those spelled
    as in the vocabulary, so an added token always keeps its file id."""
    added = []
    for index, (token, kind) in enumerate(zip(vocab.tokens, vocab.token_types)):
        if kind in (CONTROL, USER_DEFINED) and known.get(token) == index:
            added.append(AddedToken(token, special=kind == CONTROL, normalized=False))
    return added


def _post_processor(vocab: GGUFVocab) -> processors.PostProcessor:
    """Prepend BOS / append EOS when the file says llama.cpp does; otherwise leave ids alone."""
    bos, eos = vocab.special_ids.get("bos"), vocab.special_ids.get("eos")
    prefix = [(vocab.tokens[bos], bos)] if vocab.add_bos and bos is not None else []
    suffix = [(vocab.tokens[eos], eos)] if vocab.add_eos and eos is not None else []
    byte_level = processors.ByteLevel(trim_offsets=False)
    if not prefix and not suffix:
        return byte_level
    single = " ".join([f"{t}:0" for t, _ in prefix] + ["$A:0"] + [f"{t}:0" for t, _ in suffix])
    pair = single + " " + " ".join([f"{t}:1" for t, _ in prefix] + ["$B:1"] + [f"{t}:1" for t, _ in suffix])
    template = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=list(dict.fromkeys(prefix + suffix))
    )
    return processors.Sequence([byte_level, template])


def tokenizer_json(vocab: GGUFVocab, where: str) -> str:
    """The `tokenizers` JSON for a GGUF vocabulary; `where` (the file) prefixes error messages."""
    if vocab.model not in TOKENIZER_MODELS:
        raise AigcError(
            f"{where}: tokenizer model {vocab.model!r} is not supported; supported: "
            f"{', '.join(TOKENIZER_MODELS)} (byte-level BPE)"
        )
    if vocab.pre not in PRE_TOKENIZERS:
        raise AigcError(
            f"{where}: pre-tokenizer {vocab.pre!r} is not supported; supported: {', '.join(PRE_TOKENIZERS)}"
        )
    for name, index in vocab.special_ids.items():
        if not 0 <= index < len(vocab.tokens):
            raise AigcError(f"{where}: {name} token id {index} is outside the vocabulary of {len(vocab.tokens)} tokens")
    known = _vocab(vocab.tokens)
    bpe = models.BPE(
        vocab=known,
        merges=_merges(vocab.merges, where),
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
    )
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = PRE_TOKENIZERS[vocab.pre]()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = _post_processor(vocab)
    added = _added_tokens(vocab, known)
    tokenizer.add_special_tokens([t for t in added if t.special])
    tokenizer.add_tokens([t for t in added if not t.special])
    return tokenizer.to_str()
