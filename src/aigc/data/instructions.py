"""Instruction data: OpenAI fine-tuning JSONL (`{"messages": [...]}` per line) → a dataset folder whose
documents are conversations rendered with a run's chat template and tokenizer, and whose loss mask
(`{split}.mask.bin`) marks the assistant's tokens, the only ones training learns. The template is kept
in the folder (`chat_template.jinja`): a run trained on the data chats with it.

No cleaning, dedup or redaction: the conversations are training targets written on purpose, and any
change would break the template's markup. Each document is the rendered conversation, then
`<|endoftext|>` (masked out) so consecutive conversations stay apart.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from aigc.artifacts.dataset import DATASET_JSON, token_dtype, write_mask, write_split
from aigc.artifacts.run import CHAT_TEMPLATE, read_run_config, read_run_tokenizer, resolve_run_dir
from aigc.chat import load_chat_template, parse_messages
from aigc.data.publish import existing_dataset, publish
from aigc.data.turns import encode_for_training
from aigc.errors import AigcError
from aigc.fsutil import parse_jsonl_objects, read_user_text, write_json, write_text

FORMAT = "openai-chat-jsonl"


def read_conversations(path: Path) -> list[list]:
    """Every line's messages, checked; a bad line is an AigcError naming its number."""
    if not path.is_file():
        raise AigcError(f'instruction file not found: {path}; give a JSONL file of {{"messages": [...]}} lines')
    conversations = []
    text = read_user_text(path, what="instruction file")  # bytes or JSON escapes that are not UTF-8: the line
    for number, record in parse_jsonl_objects(text, path):
        if "messages" not in record:
            raise AigcError(f'{path} line {number} needs a "messages" list (OpenAI fine-tuning format)')
        _refuse_unread_keys(record, f"{path} line {number}")
        conversations.append(parse_messages(record["messages"], where=f"{path.name} line {number}: messages"))
    if not conversations:
        raise AigcError(f"{path} holds no conversations")
    return conversations


# Keys of the OpenAI formats whose content the template would drop without a word: a record with them
# would train on other text than its author meant, so it is refused instead.
UNREAD_RECORD_KEYS = ("modalities", "audio", "tools", "functions", "parallel_tool_calls")
UNREAD_MESSAGE_KEYS = ("function_call", "tool_calls", "tool_call_id", "audio", "weight")


def _refuse_unread_keys(record: dict, where: str) -> None:
    for key in UNREAD_RECORD_KEYS:
        if key in record:
            raise AigcError(f"{where}: {key!r} is not supported (aigc trains on text messages only); remove the key")
    messages = record["messages"]
    for i, message in enumerate(messages if isinstance(messages, list) else ()):
        for key in UNREAD_MESSAGE_KEYS if isinstance(message, dict) else ():
            if key in message:
                raise AigcError(
                    f"{where}: messages[{i}] has {key!r}, which aigc does not train on "
                    "(text messages only, every assistant message learned); remove the key or the message"
                )


def prepare_instructions(
    source: str | os.PathLike,
    out: str | os.PathLike,
    run: str | os.PathLike,
    *,
    val_fraction: float,
    seed: int,
    overwrite: bool = False,
) -> dict:
    """Render, tokenize, mask and split the conversations of `source` with `run`'s template and tokenizer."""
    started = time.perf_counter()
    source, out = Path(source), Path(os.path.abspath(out))
    run_dir = resolve_run_dir(run)
    template = load_chat_template(run_dir)
    tokenizer = read_run_tokenizer(run_dir, read_run_config(run_dir))
    conversations = read_conversations(source)
    options = {"format": FORMAT, "chat_template_from": str(run_dir), "val_fraction": val_fraction, "seed": seed}
    checksum = _sha256(source)
    existing = existing_dataset(out, checksum, options, overwrite)
    if existing is not None:
        return existing
    encoded = []
    for number, messages in enumerate(conversations, start=1):
        try:
            ids, mask = encode_for_training(template, tokenizer, messages)
        except AigcError as exc:
            raise AigcError(f"{source} conversation {number}: {exc}") from exc
        encoded.append((np.append(ids, np.uint32(tokenizer.eot_id)), np.append(mask, False)))  # arrays: ~5 B/token
    splits = _split(encoded, val_fraction, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        info = {"format_version": 1, "source": str(source), "source_sha256": checksum, "options": options}
        info["splits"] = {name: _write(tmp, name, docs, tokenizer.vocab_size) for name, docs in splits.items()}
        info.update(
            labels=[],
            vocab_size=tokenizer.vocab_size,
            token_dtype=token_dtype(tokenizer.vocab_size).name,
            tokenizer_fingerprint=tokenizer.vocab_fingerprint(),
            elapsed_s=round(time.perf_counter() - started, 3),
        )
        tokenizer.save(tmp / "tokenizer.json")
        write_text(tmp / CHAT_TEMPLATE, template.source)  # what the conversations were laid out with; runs keep it
        write_json(tmp / DATASET_JSON, info)
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def _split(encoded: list, val_fraction: float, seed: int) -> dict[str, list]:
    """Shuffle conversations (seeded) and hold out `val_fraction` of them (at least one) for validation."""
    if len(encoded) < 2:
        raise AigcError("instruction data needs at least 2 conversations (one is held out for validation)")
    order = list(range(len(encoded)))
    random.Random(seed).shuffle(order)
    n_val = min(len(encoded) - 1, max(1, round(len(encoded) * val_fraction)))
    return {"train": [encoded[i] for i in order[n_val:]], "val": [encoded[i] for i in order[:n_val]]}


def _write(folder: Path, split: str, docs: list, vocab_size: int) -> dict:
    counts = write_split(folder, split, (ids for ids, _ in docs), (-1 for _ in docs), vocab_size)
    write_mask(folder, split, (mask for _, mask in docs))
    counts["assistant_tokens"] = int(sum(int(mask.sum()) for _, mask in docs))
    return counts


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
