"""`aigc export RUN --format ollama`: the GGUF file plus a `Modelfile` for `ollama create NAME -f Modelfile`.

Ollama does not run Jinja chat templates: it recognises well-known ones in the GGUF's metadata and
otherwise sends the prompt as is. A run whose template renders ChatML gets Ollama's ChatML template
written out (so it does not depend on that recognition); any other template is left to Ollama.
`PARAMETER stop` lists the tokens that end the assistant's turn (what `aigc chat` stops at), and
`SYSTEM` the system prompt given with `--system`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from aigc.artifacts.run import Run, prepare_out_dir
from aigc.chat import ChatTemplate, Message
from aigc.errors import AigcError
from aigc.fsutil import write_text
from aigc.interop.gguf_export import DEFAULT_QUANT, chat_template_of, check_exportable, gguf_file_name, write_gguf

MODELFILE = "Modelfile"
# Ollama's (Go template) spelling of ChatML, as its own library models use it.
CHATML_GO = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
_CHATML_PROBE = [Message("system", "S"), Message("user", "U"), Message("assistant", "A")]
_CHATML_TEXT = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"


def _quoted(text: str) -> str:
    """A Modelfile string: triple quotes for text with newlines or quotes, else a JSON-style string."""
    if '"""' not in text and ("\n" in text or '"' in text):
        return f'"""{text}"""'
    return json.dumps(text, ensure_ascii=False)


def is_chatml(template: ChatTemplate) -> bool:
    try:
        return template.render(_CHATML_PROBE, add_generation_prompt=False) == _CHATML_TEXT
    except AigcError:  # a template that insists on other turns is not plain ChatML
        return False


def modelfile(run: Run, gguf_name: str, *, system: str | None = None) -> str:
    """The Modelfile text for `gguf_name` (a file beside it)."""
    lines = [f"FROM ./{gguf_name}"]
    source = chat_template_of(run)
    template = ChatTemplate(source, origin="of the run") if source is not None else None
    if template is not None and is_chatml(template):
        lines.append(f'TEMPLATE """{CHATML_GO}"""')
    ends = template.end_of_turn_ids(run.tokenizer) if template is not None else (run.tokenizer.eot_id,)
    for token_id in ends:
        lines.append(f"PARAMETER stop {_quoted(run.tokenizer.hf.id_to_token(token_id))}")
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    return "\n".join(lines) + "\n"


def export_ollama(
    run: Run,
    out_dir: str | os.PathLike,
    *,
    quant: str = DEFAULT_QUANT,
    system: str | None = None,
    overwrite: bool = False,
) -> Path:
    """A folder with `model-<quant>.gguf` and a `Modelfile` naming it."""
    check_exportable(run, quant)  # refused before the folder is touched
    out = prepare_out_dir(out_dir, overwrite=overwrite)
    name = gguf_file_name(quant)
    write_gguf(run, out / name, quant=quant)
    write_text(out / MODELFILE, modelfile(run, name, system=system))
    return out
