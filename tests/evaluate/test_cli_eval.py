"""`aigc eval` end to end on tiny random runs: files written, sections present, bad input refused."""

from __future__ import annotations

import json
import shutil

import pytest

from aigc.cli import main


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_dataset, tiny_tokenizer, save_tiny_run, fast):
    """One labelled GPT run evaluated once through the CLI; tests read its outputs."""
    root = tmp_path_factory.mktemp("eval")
    run = save_tiny_run(root / "gpt", tiny_tokenizer, data=tiny_dataset)
    (root / "notes.txt").write_text("a wonderful film with great acting\n", encoding="utf-8")
    code = main(["eval", str(run), *fast, "--text", str(root / "notes.txt"), "--judge", str(run)])
    assert code == 0
    return run, json.loads((run / "eval" / "metrics.json").read_text(encoding="utf-8"))


def test_eval_writes_every_section_with_what_it_was_computed_on(evaluated):
    _, result = evaluated
    for section in ("reference", "diversity", "control", "memorisation", "privacy"):
        assert "computed_on" in result[section], section
    assert result["language_modelling"]["split"]["computed_on"]["documents"] == 12
    assert result["language_modelling"]["text_file"]["tokens"] > 0
    assert result["reference"]["num_pairs"] == 4
    assert result["diversity"]["num_samples"] == 6  # 3 per label, two labels
    assert result["control"]["per_label"]["pos"]["num_samples"] == 3
    assert result["control"]["classifier"]["train_documents"] == 160
    assert result["memorisation"]["num_samples"] == 10
    assert result["fluency"]["judge"]["num_samples"] == 10
    assert result["sampling"]["max_new_tokens"] == 12 and result["config"]["seed"] == 1337
    assert all(s["tokens"] <= 12 for s in result["samples"])


def test_eval_refreshes_the_report_with_its_tables(evaluated):
    run, _ = evaluated
    markdown = (run / "report.md").read_text(encoding="utf-8")
    assert "### Control accuracy" in markdown and "BLEU" in markdown and "Computed on:" in markdown
    assert "**label `pos`**" in markdown
    assert (run / "report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_eval_same_seed_gives_same_samples(evaluated, tmp_path, fast):
    run, first = evaluated
    out = tmp_path / "again.json"
    assert main(["eval", str(run), *fast, "--out", str(out)]) == 0
    again = json.loads(out.read_text(encoding="utf-8"))
    assert [s["text"] for s in again["samples"]] == [s["text"] for s in first["samples"]]


def test_eval_unlabelled_run_skips_control_and_says_why(tmp_path, reviews, capsys, save_tiny_run, fast, write_dataset):
    from aigc.tokenizer import Tokenizer

    plain = Tokenizer.train((t for t, _ in reviews), vocab_size=400)  # no label control tokens
    data = tmp_path / "plain"
    write_dataset(data, plain, reviews, labelled=False)
    run = save_tiny_run(tmp_path / "run", plain, data=data)
    assert main(["eval", str(run), *fast]) == 0
    result = json.loads((run / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert "without labels" in result["control"]["skipped"]
    assert result["diversity"]["num_samples"] == 3  # unconditional
    assert "control accuracy skipped" in capsys.readouterr().err
    assert "Skipped: the run was trained without labels" in (run / "report.md").read_text(encoding="utf-8")


def test_eval_compares_runs_side_by_side(tmp_path, tiny_dataset, tiny_tokenizer, capsys, save_tiny_run, fast):
    gpt = save_tiny_run(tmp_path / "gpt", tiny_tokenizer, data=tiny_dataset)
    lstm = save_tiny_run(tmp_path / "lstm", tiny_tokenizer, kind="lstm", data=tiny_dataset)
    assert main(["eval", str(gpt), str(lstm), *fast]) == 0
    table = capsys.readouterr().out
    assert "gpt" in table.splitlines()[0] and "lstm" in table.splitlines()[0]
    assert "val perplexity" in table and "control accuracy" in table
    assert (gpt / "eval" / "compare.png").stat().st_size > 1000
    assert "![comparison](eval/compare.png)" in (gpt / "report.md").read_text(encoding="utf-8")


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def test_eval_run_without_its_data_asks_for_data(tmp_path, tiny_dataset, tiny_tokenizer, capsys, save_tiny_run, fast):
    unknown = save_tiny_run(tmp_path / "unknown", tiny_tokenizer)
    assert main(["eval", str(unknown), *fast]) == 2
    assert "pass --data DIR" in _error(capsys)
    moved = tmp_path / "moved"
    shutil.copytree(tiny_dataset, moved)
    run = save_tiny_run(tmp_path / "run", tiny_tokenizer, data=moved)
    shutil.rmtree(moved)
    assert main(["eval", str(run), *fast]) == 2
    assert "moved or deleted?" in _error(capsys)


def test_eval_dataset_of_another_tokenizer_is_refused(
    tmp_path, tiny_dataset, tiny_tokenizer, reviews, capsys, save_tiny_run, fast
):
    from aigc.tokenizer import Tokenizer

    other = Tokenizer.train((t for t, _ in reviews[:50]), vocab_size=300, labels=("pos", "neg"))
    (tmp_path / "data").mkdir()
    for item in tiny_dataset.iterdir():
        shutil.copy(item, tmp_path / "data" / item.name)
    other.save(tmp_path / "data" / "tokenizer.json")  # the dataset now claims another tokenizer
    run = save_tiny_run(tmp_path / "run", tiny_tokenizer, data=tmp_path / "data")
    assert main(["eval", str(run), *fast]) == 2
    assert "tokenized with a different tokenizer" in _error(capsys)


def test_eval_malformed_references_names_the_line(tmp_path, tiny_dataset, tiny_tokenizer, capsys, save_tiny_run, fast):
    run = save_tiny_run(tmp_path / "run", tiny_tokenizer, data=tiny_dataset)
    refs = tmp_path / "refs.jsonl"
    refs.write_text('{"prompt": "It was", "reference": "great"}\n{"prompt": 3}\n', encoding="utf-8")
    assert main(["eval", str(run), *fast, "--references", str(refs)]) == 2
    assert "line 2" in _error(capsys)


def test_eval_references_file_is_used_for_the_pairs(tmp_path, tiny_dataset, tiny_tokenizer, save_tiny_run, fast):
    run = save_tiny_run(tmp_path / "run", tiny_tokenizer, data=tiny_dataset)
    refs = tmp_path / "refs.jsonl"
    rows = [{"prompt": "A wonderful", "reference": "film", "label": "pos"}, {"prompt": "I hated", "reference": "it"}]
    refs.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    assert main(["eval", str(run), *fast, "--references", str(refs)]) == 0
    result = json.loads((run / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert result["reference"]["num_pairs"] == 2
    assert result["reference"]["computed_on"]["pairs_from"] == str(refs)
    assert [s["prompt"] for s in result["samples"][:2]] == ["A wonderful", "I hated"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--samples", "0"], "--samples must be >= 1"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be in [1, 8192]"),
        (["--min-span", "4"], "--min-span must be >= 8"),
        (["--temperature", "-1"], "--temperature must be 0 (greedy) or in"),
    ],
)
def test_eval_rejects_bad_options(tmp_path, tiny_dataset, tiny_tokenizer, capsys, argv, message, save_tiny_run):
    run = save_tiny_run(tmp_path / "run", tiny_tokenizer, data=tiny_dataset)
    assert main(["eval", str(run), *argv]) == 2
    assert message in _error(capsys)


def test_eval_out_with_several_runs_is_refused(tmp_path, capsys):
    assert main(["eval", "a", "b", "--out", str(tmp_path / "m.json")]) == 2
    assert "several runs" in _error(capsys)


def test_eval_missing_run_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "run folder not found" in _error(capsys)


def test_eval_keeps_freed_memory_while_it_scores_and_gives_it_back(
    tmp_path, tiny_dataset, tiny_tokenizer, save_tiny_run, fast, monkeypatch
):
    from aigc.artifacts import heap
    from aigc.evaluate import run as evaluate_run_module

    monkeypatch.delenv("AIGC_KEEP_FREED_MEMORY", raising=False)
    seen = {}

    def recording(name, stage):
        def wrapped(*args, **kwargs):
            seen[name] = heap.holders()
            return stage(*args, **kwargs)

        return wrapped

    for name in ("language_modelling", "fluency"):
        monkeypatch.setattr(evaluate_run_module, name, recording(name, getattr(evaluate_run_module, name)))
    run = save_tiny_run(tmp_path / "gpt", tiny_tokenizer, data=tiny_dataset)
    assert main(["eval", str(run), *fast]) == 0
    assert seen == dict.fromkeys(("language_modelling", "fluency"), 1 if heap.enabled() else 0)
    assert heap.holders() == 0
