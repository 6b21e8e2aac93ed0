"""One seam per model kind: nothing outside `aigc.models` (and `ModelConfig`'s own validation) branches
on a model config's `kind`; callers ask `aigc.models.kinds` instead. The registry's answers are checked
for both kinds.

The check walks the AST. A *model config* is `X.model` / `X.model_config` (`run.config.model`,
`event.model_config`), `M.config` of a model `M`, `X.get("model")` / `X["model"]` of a config.json
dict, a parameter annotated `ModelConfig`, a name `model`, or a name bound to any of these. Comparing
its `kind` (`.kind`, `.get("kind")`, `["kind"]`), matching on it, or indexing with it is a kind switch.
The `kind` of data sources, stream events and evaluation samples is none of these.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from aigc.config import MODEL_KINDS, model_preset
from aigc.errors import AigcError
from aigc.models import build_model, context_limit, kinds
from aigc.tokenizer import Tokenizer

SRC = Path(__file__).resolve().parents[1] / "src" / "aigc"
CONFIG_ATTRS = ("model", "model_config")
MODEL_NAMES = ("model",)


def _is_constant(node: ast.AST, value: str) -> bool:
    return isinstance(node, ast.Constant) and node.value == value


def _keyed(node: ast.AST, key: str) -> ast.AST | None:
    """`X` of `X.get(key, ...)` or `X[key]`, else None."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        if node.args and _is_constant(node.args[0], key):
            return node.func.value
    if isinstance(node, ast.Subscript) and _is_constant(node.slice, key):
        return node.value
    return None


class KindSwitches(ast.NodeVisitor):
    """Collects `file:line` of every comparison, match or lookup on a model config's kind."""

    def __init__(self, where: str, tree: ast.Module):
        self.where, self.found = where, []
        self.names = set(MODEL_NAMES) | self._bound_names(tree)

    def _bound_names(self, tree: ast.Module) -> set[str]:
        """Names annotated `ModelConfig` or assigned a model config (to a fixed point: `m = e.model_config`)."""
        names = {
            arg.arg
            for arg in ast.walk(tree)
            if isinstance(arg, ast.arg) and arg.annotation is not None and "ModelConfig" in ast.unparse(arg.annotation)
        }
        assigns = [node for node in ast.walk(tree) if isinstance(node, ast.Assign)]
        while True:
            self.names = set(MODEL_NAMES) | names
            more = {
                target.id
                for node in assigns
                if self.is_model_config(node.value)
                for target in node.targets
                if isinstance(target, ast.Name)
            }
            if more <= names:
                return names
            names |= more

    def is_model_config(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Name):
            return node.id in self.names
        if isinstance(node, ast.Attribute):
            if node.attr in CONFIG_ATTRS:
                return True
            value = node.value  # `model.config`, `run.model.config`: the config of a model module
            return node.attr == "config" and (
                (isinstance(value, ast.Name) and value.id in self.names)
                or (isinstance(value, ast.Attribute) and value.attr == "model")
            )
        return _keyed(node, "model") is not None

    def is_kind(self, node: ast.AST) -> bool:
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(self.is_kind(element) for element in node.elts)
        if isinstance(node, ast.Attribute) and node.attr == "kind":
            return self.is_model_config(node.value)
        owner = _keyed(node, "kind")
        return owner is not None and self.is_model_config(owner)

    def _flag(self, node: ast.AST) -> None:
        self.found.append(f"{self.where}:{node.lineno}: {ast.unparse(node)}")

    def visit_Compare(self, node: ast.Compare) -> None:
        if any(self.is_kind(operand) for operand in (node.left, *node.comparators)):
            self._flag(node)
        self.generic_visit(node)

    def visit_Match(self, node: ast.Match) -> None:
        if self.is_kind(node.subject):
            self._flag(node)
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if self.is_kind(node.slice):  # KINDS[config.kind]: a table keyed by kind
            self._flag(node)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        is_get = isinstance(node.func, ast.Attribute) and node.func.attr == "get"
        if is_get and node.args and self.is_kind(node.args[0]):  # TABLE.get(config.kind)
            self._flag(node)
        self.generic_visit(node)


def kind_switches(source: str, where: str = "<test>") -> list[str]:
    tree = ast.parse(source)
    checker = KindSwitches(where, tree)
    checker.visit(tree)
    return checker.found


def _model_config_validation(tree: ast.Module) -> ast.Module:
    """config.py without `class ModelConfig`: the config may check its own kind; nothing else there may."""
    body = [node for node in tree.body if not (isinstance(node, ast.ClassDef) and node.name == "ModelConfig")]
    return ast.Module(body=body, type_ignores=[])


def test_no_model_kind_switch_outside_models():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC)
        if relative.parts[0] == "models":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if relative == Path("config.py"):
            tree = _model_config_validation(tree)
        checker = KindSwitches(str(relative), tree)
        checker.visit(tree)
        found += checker.found
    assert not found, "model-kind switches outside aigc.models (ask aigc.models.kinds instead):\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        # The switches this seam replaced, as they were written.
        "def f(model):\n    return model.config.block_size if model.config.kind == 'gpt' else None",
        "context = run.config.model.block_size if run.config.model.kind == 'gpt' else None",
        "if base.model.kind != 'gpt':\n    raise E",
        "m = e.model_config\nshape = 'heads' if m.kind == 'gpt' else 'hidden'",
        "def f(config: ModelConfig):\n    return (config.kind, config.norm) == ('gpt', 'rmsnorm')",
        "def f(model: dict):\n    return model.get('kind') == 'gpt'",
        "model = config.get('model', {})\nok = model['kind'] in ('gpt', 'lstm')",
        "match run.config.model.kind:\n    case 'gpt':\n        pass",
        "backend = BACKENDS[self.model.config.kind]",
    ],
)
def test_the_checker_catches_a_kind_switch(source):
    assert len(kind_switches(source)) == 1


@pytest.mark.parametrize(
    "source",
    [
        "samples = [item for item in items if item.kind == 'sample']",
        "if source.kind in ('txt', 'folder'):\n    pass",
        "free = [s for s in samples if s['kind'] == 'sample']",
        "kind, row, payload = job.next()\nif kind == 'event':\n    pass",
        "summary = {'kind': run.config.model.kind}",  # reading the name for display is no switch
        "config = ModelConfig(kind='gpt')",
    ],
)
def test_the_checker_leaves_other_kinds_alone(source):
    assert kind_switches(source) == []


def test_every_configurable_kind_has_one_registry_entry():
    assert tuple(kinds.KINDS) == MODEL_KINDS


@pytest.mark.parametrize(
    ("kind", "limit", "backend", "grows", "family"),
    [("gpt", 64, "KVCacheBackend", True, "GPT-2"), ("lstm", None, "RecurrentBackend", False, "LSTM")],
)
def test_the_registry_answers_for_each_kind(kind, limit, backend, grows, family):
    config = model_preset("tiny", kind=kind, vocab_size=50)
    model = build_model(config)
    assert context_limit(model) == limit
    assert type(kinds.decode_backend(model, 0, torch.device("cpu"))).__name__ == backend
    assert kinds.grows_vocabulary(config) is grows
    summary = kinds.describe(model)
    assert summary.family == family and summary.parameters == summary.trainable == model.num_params()
    assert summary.line().startswith(f"{family}: {model.num_params() / 1e6:.2f} M parameters; 2 layers")


def test_a_llama_shaped_config_is_described_as_llama_with_its_key_value_heads():
    summary = kinds.describe(build_model(model_preset("llama-tiny", vocab_size=50)))
    assert summary.family == "Llama" and "4 heads (2 key/value), context 64, vocabulary 50" in summary.shape


def test_an_lstm_vocabulary_cannot_grow_but_growing_to_its_own_size_is_a_no_op(tiny_tokenizer):
    model = build_model(model_preset("tiny", kind="lstm", vocab_size=tiny_tokenizer.vocab_size))
    assert kinds.grow_vocabulary(model, tiny_tokenizer, tiny_tokenizer.vocab_size) is model
    with pytest.raises(AigcError, match="LSTM model's vocabulary cannot grow"):
        kinds.grow_vocabulary(model, tiny_tokenizer, tiny_tokenizer.vocab_size + 2)


def test_a_gpt_vocabulary_grows_by_the_new_label_rows(tiny_tokenizer: Tokenizer):
    size = tiny_tokenizer.vocab_size
    model = build_model(model_preset("tiny", vocab_size=size - 2))
    kinds.grow_vocabulary(model, tiny_tokenizer, size, frozen=True)
    assert model(torch.tensor([[size - 1]]))[0].shape == (1, 1, size)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "wte.new_rows" in trainable and "wte.weight" not in trainable  # the base table stays frozen
