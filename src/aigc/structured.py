"""Structured output: a grammar per decode row (a JSON Schema, any JSON object), enforced as a mask.

The grammar engine is llguidance (docs/generate.md compares it with xgrammar and outlines-core): it
builds a token trie from the tokenizer's own vocabulary, so it works for every tokenizer aigc runs,
and it refuses JSON-Schema keywords it cannot enforce instead of ignoring them. That refusal is the
point of this module: a schema is checked when it is compiled, and anything the engine cannot enforce
is an AigcError naming the construct, never a silently unconstrained decode.

Flow: `json_grammar(schema)` checks and compiles once per (tokenizer, schema) (cached); the decode
loop gives each constrained row a `GrammarState`, asks `allowed_tokens` for the (B, V) mask before
sampling, and feeds each sampled token back with `GrammarState.advance`.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import llguidance
import torch

from aigc.errors import AigcError
from aigc.tokenizer import Tokenizer

# One line of JSON with OpenAI's separators: a small model given free whitespace tends to spend its
# token budget on newlines inside an object.
_JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False, "lenient": False}
_BITS = torch.arange(32, dtype=torch.int32)  # (32,) bit positions of one mask word


@dataclass(frozen=True)
class Grammar:
    """A grammar that compiled: llguidance's grammar text, and a name for messages."""

    source: str  # llguidance grammar (JSON text)
    what: str  # e.g. "JSON schema 'review'": how errors name it


def json_grammar(schema: dict | None, name: str = "schema") -> Grammar:
    """A grammar for JSON matching `schema` (None: any JSON object). Checks that llguidance can enforce
    every keyword; an invalid or unsupported schema raises AigcError naming the construct."""
    if schema is None:
        schema, what = {"type": "object"}, "JSON object"
    else:
        what = f"JSON schema {name!r}"
    if not isinstance(schema, dict):
        raise AigcError(f"{what} must be a JSON object (a JSON Schema), got {type(schema).__name__}")
    try:
        source = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
    except (ValueError, TypeError, RuntimeError) as exc:  # llguidance's ways of refusing a schema
        raise AigcError(f"{what} is not valid JSON Schema: {exc}") from exc
    return check_grammar(Grammar(source, what))


def check_grammar(grammar: Grammar) -> Grammar:
    """The grammar itself, once llguidance has compiled it; its first error as an AigcError otherwise
    (an unsupported keyword, a regex that does not compile, an unknown type)."""
    error = _compile_error(grammar.source)
    if error:
        raise AigcError(f"{grammar.what} cannot be enforced: {error}; remove or rewrite that construct")
    return grammar


@functools.lru_cache(maxsize=256)
def _compile_error(source: str) -> str:
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(source)
    return " ".join(messages[0].split()) if is_error else ""  # one line: the CLI prints one


# ---------------------------------------------------------------------------------------------
# Per-row state during a decode
# ---------------------------------------------------------------------------------------------

_ENGINE_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _engine_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of a tokenizer (its vocabulary as bytes, a token trie): ~1 s to build, so kept
    as long as the Tokenizer lives."""
    engine = _ENGINE_TOKENIZERS.get(tokenizer)
    if engine is None:
        engine = llguidance.LLTokenizer(tokenizer.hf.to_str(), eos_token=tokenizer.eot_id)
        _ENGINE_TOKENIZERS[tokenizer] = engine
    return engine


@functools.lru_cache(maxsize=256)
def _template(engine: llguidance.LLTokenizer, source: str) -> llguidance.LLMatcher:
    """A fresh matcher compiled once per (tokenizer, grammar); rows start from copies of it."""
    return llguidance.LLMatcher(engine, source, log_level=0)


class GrammarState:
    """Where one row stands in its grammar."""

    def __init__(self, tokenizer: Tokenizer, grammar: Grammar, end_ids: tuple[int, ...] = ()):
        """end_ids: tokens other than end-of-text that end the row (a chat template's end of turn);
        they are allowed wherever the grammar allows end-of-text."""
        engine = _engine_tokenizer(tokenizer)
        template = _template(engine, grammar.source)
        if template.is_error():  # validated already: only a resource limit gets here
            raise AigcError(f"{grammar.what} cannot be enforced: {template.get_error()}")
        self.matcher = template.deep_copy()
        self.grammar = grammar
        self.vocab = engine.vocab_size
        self.eot = tokenizer.eot_id
        self.end_ids = end_ids

    def advance(self, token: int) -> bool:
        """Feed the sampled token; True when the grammar is complete and nothing more may follow."""
        if not self.matcher.consume_token(token):
            # The mask allowed only tokens the grammar accepts, so this is a bug, not a user error.
            raise RuntimeError(f"{self.grammar.what}: token {token} rejected: {self.matcher.get_error()}")
        return self.matcher.is_stopped()

    @property
    def complete(self) -> bool:
        """True when the text so far is a whole sentence of the grammar (e.g. a closed JSON object)."""
        return self.matcher.is_accepting()


def allowed_tokens(states: list[GrammarState | None], vocab: int) -> torch.Tensor | None:
    """(B, V) bool: the tokens each row's grammar allows next (every token for rows without one);
    None when no row is constrained, so unconstrained batches pay nothing."""
    constrained = [r for r, state in enumerate(states) if state is not None]
    if not constrained:
        return None
    engine_vocab = states[constrained[0]].vocab
    words = torch.full((len(states), (engine_vocab + 31) // 32), -1, dtype=torch.int32)  # (B, W) packed bits
    for r in constrained:
        # llguidance writes row r's mask in place (its own llguidance.torch helper does the same, but
        # importing that module pulls in torch._dynamo: ~6 s of start-up for every command).
        row = words[r]
        states[r].matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
    bits = ((words.unsqueeze(-1) >> _BITS) & 1).bool().flatten(1)  # (B, W * 32), bit j of word w = token 32w+j
    allowed = torch.ones(len(states), vocab, dtype=torch.bool)
    shared = min(vocab, engine_vocab)
    allowed[:, :shared] = bits[:, :shared]
    for r in constrained:
        allowed[r, shared:] = False  # padded embedding rows beyond the tokenizer are no tokens
        if allowed[r, states[r].eot] and states[r].end_ids:
            allowed[r, list(states[r].end_ids)] = True
    return allowed
