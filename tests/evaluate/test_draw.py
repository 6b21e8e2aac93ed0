"""Which requests `evaluate.run.draw` makes: per-label samples, their text prompts and guidance."""

import pytest

from aigc.config import EvalConfig, SampleConfig
from aigc.evaluate import run as evaluate_run_module
from aigc.evaluate.reference import Pair
from aigc.models import load_run

PROMPTS = {"pos": "I loved it.", "neg": "I hated it."}


@pytest.fixture
def captured(monkeypatch):
    """Record the requests instead of decoding them (every completion is empty)."""
    seen = []

    def fake_generate_all(run, requests, batch_size):
        seen.extend(requests)
        return [type("C", (), {"text": "", "token_ids": ()})() for _ in requests]

    monkeypatch.setattr(evaluate_run_module, "generate_all", fake_generate_all)
    return seen


def test_guided_samples_steer_away_from_the_other_label_and_continuations_are_unguided(
    tmp_path, tiny_tokenizer, save_tiny_run, captured
):
    run = load_run(save_tiny_run(tmp_path / "run", tiny_tokenizer))
    pairs = [Pair(prompt="a film", reference="x", label="pos")]
    sampling = SampleConfig(guidance_scale=3.0)
    items = evaluate_run_module.draw(run, pairs, EvalConfig(samples=2), sampling, PROMPTS)
    continuation, *samples = captured
    assert continuation.config.guidance_scale == 1.0 and continuation.negative_label is None
    assert [(r.label, r.prompt, r.negative_label, r.negative_prompt) for r in samples] == [
        ("pos", "I loved it.", "neg", "I hated it."),
        ("pos", "I loved it.", "neg", "I hated it."),
        ("neg", "I hated it.", "pos", "I loved it."),
        ("neg", "I hated it.", "pos", "I loved it."),
    ]
    assert all(r.config.guidance_scale == 3.0 for r in samples)
    assert [i.label for i in items] == ["pos", "pos", "pos", "neg", "neg"]


def test_a_run_without_labels_files_each_prompts_samples_under_its_label(tmp_path, reviews, save_tiny_run, captured):
    from aigc.tokenizer import Tokenizer

    plain = Tokenizer.train((t for t, _ in reviews), vocab_size=300)  # no control tokens
    run = load_run(save_tiny_run(tmp_path / "base", plain))
    items = evaluate_run_module.draw(run, [], EvalConfig(samples=1), SampleConfig(guidance_scale=2.0), PROMPTS)
    assert [(r.label, r.prompt, r.negative_label, r.negative_prompt) for r in captured] == [
        (None, "I loved it.", None, "I hated it."),
        (None, "I hated it.", None, "I loved it."),
    ]
    assert [(i.label, i.prompt) for i in items] == [("pos", "I loved it."), ("neg", "I hated it.")]
