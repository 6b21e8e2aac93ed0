"""`--json-schema FILE` / `--json-object` on generate, batch (with --json-columns) and chat."""

import csv
import json

import jsonschema
import pytest

from aigc.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMA = {
    "type": "object",
    "properties": {"sentiment": {"enum": ["pos", "neg"]}, "score": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["sentiment", "score"],
    "additionalProperties": False,
}
SAMPLING = ("--max-new-tokens", "60", "--seed", "4", "--temperature", "1")


@pytest.fixture
def schema_file(tmp_path):
    path = tmp_path / "review.json"
    path.write_text(json.dumps(SCHEMA), encoding="utf-8")
    return path


def test_generate_json_schema_prints_objects_that_validate(make_run, capsys, schema_file):
    code = main(["generate", str(make_run()), "--json-schema", str(schema_file), "-n", "3", "--json", *SAMPLING])
    out, _ = capsys.readouterr()
    assert code == 0
    for line in out.splitlines():
        jsonschema.validate(json.loads(json.loads(line)["text"]), SCHEMA)


def test_batch_json_columns_write_each_field_to_its_column(make_run, capsys, tmp_path, schema_file):
    source = tmp_path / "in.csv"
    source.write_text("title,score\nHeat,x\nCats,y\n", encoding="utf-8")
    out = tmp_path / "out.csv"
    args = ["batch", str(make_run()), "--input", str(source), "--template", "Review {title}:", "--out", str(out)]
    assert main([*args, "--json-schema", str(schema_file), "--json-columns", *SAMPLING]) == 0
    with open(out, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["title"], r["score"]) for r in rows] == [("Heat", "x"), ("Cats", "y")]  # input columns kept
    for row in rows:
        expected = {"sentiment": row["sentiment"], "score": int(row["generated.score"])}
        assert json.loads(row["generated"]) == expected


def test_generate_says_when_the_json_is_incomplete(make_run, capsys, schema_file):
    args = ["generate", str(make_run()), "--json-schema", str(schema_file), "--json", "--max-new-tokens", "2"]
    assert main([*args, "--seed", "1"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["json_complete"] is False and "the JSON is incomplete" in err


def test_chat_json_object_answers_with_an_object(make_chat_run, capsys):
    args = ["chat", str(make_chat_run(block_size=256)), "--message", "hi", "--json-object", *SAMPLING]
    assert main(args) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("{")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"type": "array", "uniqueItems": true}', "uniqueItems"),
        ("{not json", "is not JSON"),
        (None, "file not found"),
    ],
)
def test_bad_schema_file_is_one_line_error(make_run, capsys, tmp_path, content, message):
    path = tmp_path / "schema.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    assert main(["generate", str(make_run()), "--json-schema", str(path)]) == 2
    _, err = capsys.readouterr()
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_json_columns_without_a_schema_is_refused(make_run, capsys, tmp_path):
    source = tmp_path / "in.csv"
    source.write_text("title\nHeat\n", encoding="utf-8")
    args = ["batch", str(make_run()), "--input", str(source), "--template", "{title}", "--out", str(tmp_path / "o.csv")]
    assert main([*args, "--json-columns"]) == 2
    assert "--json-columns needs" in capsys.readouterr().err
