import csv
import json

import pytest

import aigc.generate
from aigc.cli import main
from aigc.config import SampleConfig
from aigc.generate import Request, generate
from aigc.models import load_run

TEMPLATE = "Write a {sentiment} review of {title}:"
ROWS = [
    {"title": "The Matrix", "sentiment": "pos"},
    {"title": "Heat, the film", "sentiment": "neg"},
    {"title": "卧虎藏龙", "sentiment": "pos"},
    {"title": "Cats", "sentiment": "neg"},
]
OPTIONS = ("--max-new-tokens", "6", "--seed", "10", "--batch-size", "2")


pytestmark = pytest.mark.usefixtures("one_thread")


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def batch(capsys, run_dir, source, out, *extra):
    code = main(["batch", str(run_dir), "--input", str(source), "--template", TEMPLATE, "--out", str(out), *extra])
    _, err = capsys.readouterr()
    return code, err


def test_batch_csv_rows_get_a_generated_column(make_run, capsys, tmp_path):
    run_dir = make_run()
    out = tmp_path / "out.csv"
    code, err = batch(capsys, run_dir, write_csv(tmp_path / "rows.csv", ROWS), out, *OPTIONS)
    assert code == 0 and "wrote 4 rows" in err
    with open(out, newline="", encoding="utf-8") as f:
        written = list(csv.DictReader(f))
    assert [{k: r[k] for k in ("title", "sentiment")} for r in written] == ROWS
    run = load_run(run_dir)
    prompt = TEMPLATE.format(**ROWS[2])
    [expected] = generate(run.model, run.tokenizer, [Request(prompt, config=SampleConfig(max_new_tokens=6, seed=12))])
    assert written[2]["generated"] == expected.text  # row i is seeded with seed + i


def test_batch_jsonl_with_label_field(make_run, capsys, tmp_path):
    run_dir = make_run()
    out = tmp_path / "out.jsonl"
    source = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    code, _ = batch(capsys, run_dir, source, out, *OPTIONS, "--label-field", "sentiment")
    assert code == 0
    written = read_jsonl(out)
    run = load_run(run_dir)
    config = SampleConfig(max_new_tokens=6, seed=11)
    [expected] = generate(run.model, run.tokenizer, [Request(TEMPLATE.format(**ROWS[1]), "neg", config)])
    assert written[1] == {**ROWS[1], "generated": expected.text}


def test_batch_resume_skips_rows_already_written(make_run, capsys, tmp_path):
    run_dir, source, out = make_run(), write_jsonl(tmp_path / "rows.jsonl", ROWS), tmp_path / "out.jsonl"
    assert batch(capsys, run_dir, source, out, *OPTIONS)[0] == 0
    full = read_jsonl(out)
    write_jsonl(out, [{**row, "generated": "KEPT"} for row in ROWS[:2]])
    code, err = batch(capsys, run_dir, source, out, *OPTIONS, "--resume")
    assert code == 0 and "2/4" in err  # the progress bar starts after the rows already done
    assert read_jsonl(out) == [{**ROWS[0], "generated": "KEPT"}, {**ROWS[1], "generated": "KEPT"}] + full[2:]


def test_batch_interrupted_output_is_valid_and_resumable(make_run, capsys, tmp_path, monkeypatch):
    run_dir, source, out = make_run(), write_csv(tmp_path / "rows.csv", ROWS), tmp_path / "out.csv"
    calls = []
    real = aigc.generate.generate

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(aigc.generate, "generate", interrupted)
    assert batch(capsys, run_dir, source, out, *OPTIONS)[0] == 130
    with open(out, newline="", encoding="utf-8") as f:
        assert [r["title"] for r in csv.DictReader(f)] == ["The Matrix", "Heat, the film"]
    monkeypatch.setattr(aigc.generate, "generate", real)
    assert batch(capsys, run_dir, source, out, *OPTIONS, "--resume")[0] == 0
    with open(out, newline="", encoding="utf-8") as f:
        assert [r["title"] for r in csv.DictReader(f)] == [r["title"] for r in ROWS]


def test_batch_refuses_to_replace_output_unless_asked(make_run, capsys, tmp_path):
    run_dir, source, out = make_run(), write_csv(tmp_path / "rows.csv", ROWS), tmp_path / "out.csv"
    out.write_text("precious\n", encoding="utf-8")
    code, err = batch(capsys, run_dir, source, out)
    assert code == 2 and "exists; pass --resume" in err and out.read_text(encoding="utf-8") == "precious\n"
    assert batch(capsys, run_dir, source, out, *OPTIONS, "--overwrite")[0] == 0


@pytest.mark.parametrize(
    ("rows", "extra", "message"),
    [
        ([ROWS[0], {"title": "x"}], (), "row 2 has no field 'sentiment' that --template needs; its fields: title"),
        (ROWS, ("--label-field", "title"), "row 1: unknown label 'The Matrix'; this run knows: pos, neg"),
        (ROWS, ("--batch-size", "0"), "--batch-size must be in [1, 256]"),
        (ROWS, ("--top-p", "2"), "--top-p must be in [1e-06, 1]"),
        ([{**ROWS[0], "generated": "x"}], (), "already has a 'generated' column"),
    ],
)
def test_batch_bad_input_is_one_line_error(make_run, capsys, tmp_path, rows, extra, message):
    code, err = batch(capsys, make_run(), write_jsonl(tmp_path / "rows.jsonl", rows), tmp_path / "o.csv", *extra)
    assert code == 2 and err.count("\n") == 1 and message in err
    assert not (tmp_path / "o.csv").exists()


def test_batch_bad_files_are_one_line_errors(make_run, capsys, tmp_path):
    run_dir = make_run()
    assert "must end in .csv or .jsonl" in batch(capsys, run_dir, tmp_path / "rows.xlsx", tmp_path / "o.csv")[1]
    assert "--input file not found" in batch(capsys, run_dir, tmp_path / "none.csv", tmp_path / "o.csv")[1]
    (tmp_path / "bad.jsonl").write_text('{"title": "a"}\nnot json\n', encoding="utf-8")
    assert "line 2 is not valid JSON" in batch(capsys, run_dir, tmp_path / "bad.jsonl", tmp_path / "o.csv")[1]
    (tmp_path / "empty.csv").write_text("title,sentiment\n", encoding="utf-8")
    assert "holds no rows" in batch(capsys, run_dir, tmp_path / "empty.csv", tmp_path / "o.csv")[1]


def test_batch_resume_refuses_an_output_of_other_rows(make_run, capsys, tmp_path):
    run_dir, out = make_run(), tmp_path / "out.jsonl"
    write_jsonl(out, [{"title": "Other", "sentiment": "pos", "generated": "x"}])
    code, err = batch(capsys, run_dir, write_jsonl(tmp_path / "rows.jsonl", ROWS), out, "--resume")
    assert code == 2 and "row 1 of --out" in err and "differs from --input" in err


def test_chat_mode_renders_each_row_as_a_user_message(make_chat_run, tmp_path):
    # Deferred: only this test needs the chat module.
    from aigc.chat import Message, encode_chat, load_chat_template

    run_dir = make_chat_run()
    rows = write_csv(tmp_path / "rows.csv", ROWS)
    out = tmp_path / "out.jsonl"
    args = ["batch", str(run_dir), "--input", str(rows), "--template", TEMPLATE, "--out", str(out), *OPTIONS]
    assert main([*args, "--system", "be brief"]) == 0
    written = read_jsonl(out)
    run = load_run(run_dir)
    template = load_chat_template(run_dir)
    for i, row in enumerate(written):
        messages = [Message("system", "be brief"), Message("user", TEMPLATE.format_map(ROWS[i]))]
        prompt = encode_chat(template, run.tokenizer, messages, context=None)
        config = SampleConfig(max_new_tokens=6, seed=10 + i)
        expected = generate(
            run.model, run.tokenizer, [Request(prompt_ids=prompt.ids, stop_ids=prompt.stop_ids, config=config)]
        )
        assert row["generated"] == expected[0].text


def test_chat_mode_needs_a_template(make_run, tmp_path, capsys):
    rows = write_csv(tmp_path / "rows.csv", ROWS)
    args = ["batch", str(make_run()), "--input", str(rows), "--template", TEMPLATE, "--out", str(tmp_path / "o.csv")]
    assert main([*args, "--chat"]) == 2
    assert "has no chat template" in capsys.readouterr().err
