"""Byte-level BPE tokenizer: a thin wrapper over Hugging Face `tokenizers`, saved as JSON.

Byte-level means every Unicode string (Chinese, emoji, anything) maps to tokens and back exactly:
`decode(encode(text)) == text`. Special tokens: end-of-text, padding, and one control token per
label value (`<|pos|>`), which conditions generation on that label.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from aigc.errors import AigcError
from aigc.fsutil import write_with

EOT = "<|endoftext|>"
PAD = "<|pad|>"
BYTE_ALPHABET = 256
# Long texts are trained on and encoded in pieces of about this many characters: the Rust side keeps
# ~250 bytes per token of a text it is given (offsets, strings), so one 50 MB document took GBs.
PIECE_CHARS = 1 << 16


def text_pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """`text` cut into pieces of about `size` characters, only before a single space between two
    non-space characters. The byte-level pre-tokenizer (GPT-2 regex) never joins across such a
    point (" word" starts a new pre-token), so pieces give the same tokens as the whole text."""
    start = 0
    while len(text) - start > size:
        cut = _safe_cut(text, start + size)
        if cut < 0:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


def _safe_cut(text: str, at: int) -> int:
    """First index >= `at` of a space with a non-space on each side, or -1."""
    while (at := text.find(" ", at)) > 0:
        if at + 1 < len(text) and not text[at - 1].isspace() and not text[at + 1].isspace():
            return at
        at += 1
    return -1


def _joins_no_cut(pre: pre_tokenizers.PreTokenizer | None) -> bool:
    """Whether no pre-token of `pre` spans a `text_pieces` cut (a space between two non-spaces): the
    byte-level GPT-2 regex starts a new pre-token at " word"; digit splitting (SmolLM2 runs it before the
    byte level) never joins a space to anything; a sequence of such steps neither."""
    if isinstance(pre, pre_tokenizers.ByteLevel):
        return bool(pre.use_regex)
    if isinstance(pre, pre_tokenizers.Digits):
        return True
    return isinstance(pre, pre_tokenizers.Sequence) and all(_joins_no_cut(step) for step in pre)


def label_token(label: str) -> str:
    """The control token for a label value: `pos` -> `<|pos|>`."""
    return f"<|{label}|>"


class Tokenizer:
    """Encode/decode text; knows its special ids and the labels it has control tokens for."""

    def __init__(self, hf: HFTokenizer, labels: Sequence[str] | None = None):
        """`labels`: the control-token labels, when known (run and dataset files record them); by default
        every special `<|name|>` token other than end-of-text and padding (right for aigc-made tokenizers,
        not for imported ones, whose chat tokens such as `<|im_start|>` are no labels)."""
        self.hf = hf
        eot, pad = hf.token_to_id(EOT), hf.token_to_id(PAD)
        if eot is None or pad is None:
            raise AigcError(f"tokenizer lacks the {EOT} / {PAD} special tokens; prepare the data with aigc")
        self.eot_id: int = eot
        self.pad_id: int = pad
        added = hf.get_added_tokens_decoder()  # {id: AddedToken}
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        specials = [t.content for t in added.values() if t.special]
        if labels is None:
            labels = [s[2:-2] for s in specials if s not in (EOT, PAD) and s.startswith("<|") and s.endswith("|>")]
        missing = [label for label in labels if label_token(label) not in specials]
        if missing:
            raise AigcError(f"tokenizer lacks the control tokens of labels {missing}; prepare the data again")
        self.labels: tuple[str, ...] = tuple(labels)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, labels: Sequence[str] = ()) -> Tokenizer:
        """Train byte-level BPE on `texts` (an iterator is fine: it is streamed)."""
        specials = [EOT, PAD] + [label_token(label) for label in labels]
        minimum = BYTE_ALPHABET + len(specials) + 1
        if vocab_size < minimum:
            raise AigcError(
                f"--vocab-size {vocab_size} is too small: the byte alphabet plus {len(specials)} special "
                f"tokens need at least {minimum}; use --vocab-size {max(minimum, 512)} or more"
            )
        hf = HFTokenizer(models.BPE())
        # No normaliser: cleaning already did NFC, and any normaliser would break the exact round trip.
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator((piece for text in texts for piece in text_pieces(text)), trainer=trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: str | os.PathLike, labels: Sequence[str] | None = None) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise AigcError(f"tokenizer file not found: {path}; point to a tokenizer.json made by aigc prepare")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise AigcError(f"cannot read tokenizer {path}: {exc}; re-create it with aigc prepare") from exc
        return cls(hf, labels)

    def with_labels(self, labels: Sequence[str]) -> Tokenizer:
        """A copy that also has control tokens for `labels`: the missing ones are appended after the
        last id (so every existing id keeps its meaning, as a pretrained model's embedding needs)."""
        missing = [label for label in labels if label not in self.labels]
        if not missing:
            return self
        hf = HFTokenizer.from_str(self.hf.to_str())
        hf.add_special_tokens([label_token(label) for label in missing])
        return Tokenizer(hf, [*self.labels, *missing])

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temp file + rename) so a crash never leaves half a tokenizer."""
        write_with(path, lambda tmp: self.hf.save(str(tmp)))

    # -- use ------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    @property
    def splits_safely(self) -> bool:
        """True when encoding `text_pieces(text)` gives the ids of `text` (aigc's own byte-level BPE, and
        imported ones that split digits first, as SmolLM2's; others may normalise or mark word starts
        differently, and are given whole texts)."""
        return self.hf.normalizer is None and _joins_no_cut(self.hf.pre_tokenizer)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def decode_batch(self, batch: Sequence[Sequence[int]], *, skip_special: bool = True) -> list[str]:
        return self.hf.decode_batch([list(ids) for ids in batch], skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (b'' for special tokens)."""
        token = self.hf.id_to_token(token_id)
        if token is None or self.is_special(token_id):
            return b""
        return bytes(_BYTE_DECODER[ch] for ch in token)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def label_id(self, label: str) -> int:
        """Id of a label's control token; unknown labels are a user error listing the known ones."""
        if label not in self.labels:
            known = ", ".join(self.labels) if self.labels else "none (the run was trained without labels)"
            raise AigcError(f"unknown label {label!r}; this run knows: {known}")
        return self.hf.token_to_id(label_token(label))

    def vocab_fingerprint(self) -> str:
        """A short hash of the vocabulary, to check a dataset and a run share one tokenizer."""
        vocab = json.dumps(sorted(self.hf.get_vocab(with_added_tokens=True).items()))
        return hashlib.sha256(vocab.encode()).hexdigest()[:16]


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-unicode table used by the ByteLevel pre-tokenizer."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


_BYTE_DECODER = _byte_decoder()
