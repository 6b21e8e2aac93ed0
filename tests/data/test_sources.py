import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aigc.config import PrepareConfig
from aigc.data.sources import ReadStats, read_source, resolve_source, source_sha256
from aigc.errors import AigcError


def _read(path, **options):
    stats = ReadStats()
    records = list(read_source(resolve_source(str(path)), PrepareConfig(**options), stats))
    return records, stats


def test_resolve_source_missing_path_names_what_is_accepted(tmp_path):
    with pytest.raises(AigcError, match=r"source not found: .*nope\.csv; give a file .*imdb, rotten-tomatoes"):
        resolve_source(str(tmp_path / "nope.csv"))


def test_resolve_source_rejects_unsupported_extension(tmp_path):
    (tmp_path / "book.xlsx").write_bytes(b"x")
    with pytest.raises(AigcError, match=r"unsupported file type '\.xlsx'.*\.txt, \.csv, \.tsv, \.jsonl, \.parquet"):
        resolve_source(str(tmp_path / "book.xlsx"))


def test_resolve_source_rejects_folder_without_txt(tmp_path):
    (tmp_path / "a.md").write_text("hi")
    with pytest.raises(AigcError, match="holds no .txt files"):
        resolve_source(str(tmp_path))


def test_read_txt_splits_on_blank_lines(tmp_path):
    (tmp_path / "c.txt").write_text("first doc\nstill first\n\n  \nsecond doc\n\n\nthird", encoding="utf-8")
    records, stats = _read(tmp_path / "c.txt")
    assert [text for text, _ in records] == ["first doc\nstill first\n", "second doc\n", "third"]
    assert all(label is None for _, label in records)
    assert stats.documents == 3


def test_read_txt_folder_doc_per_file_in_sorted_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("two\n\nparagraphs")
    (tmp_path / "sub" / "a.txt").write_text("nested")
    (tmp_path / "skip.md").write_text("not text")
    records, _ = _read(tmp_path, doc_per_file=True)
    assert [text for text, _ in records] == ["two\n\nparagraphs", "nested"]


def test_read_txt_counts_invalid_utf8_instead_of_failing(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 ok\n\nfine \xff\xfe end")
    records, stats = _read(tmp_path / "bad.txt")
    assert [text for text, _ in records] == ["caf\ufffd ok\n", "fine \ufffd\ufffd end"]
    assert stats.invalid_utf8_bytes == 3


def _write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_read_csv_quoted_multiline_text_and_labels(tmp_path):
    path = _write_csv(
        tmp_path / "r.csv", ["id", "review", "stars"], [[1, 'he said "wow"\nnew line', "good"], [2, "meh", "bad"]]
    )
    records, _ = _read(path, text_column="review", label_column="stars")
    assert records == [('he said "wow"\nnew line', "good"), ("meh", "bad")]


def test_read_tsv_uses_tabs(tmp_path):
    path = _write_csv(tmp_path / "r.tsv", ["text", "label"], [["a, b, c", "x"], ["d", "y"]], delimiter="\t")
    records, _ = _read(path, label_column="label")
    assert records == [("a, b, c", "x"), ("d", "y")]


def test_read_csv_missing_column_lists_existing_ones(tmp_path):
    path = _write_csv(tmp_path / "r.csv", ["review", "stars"], [["a", "1"]])
    with pytest.raises(
        AigcError, match=r"no column 'text'; columns there: 'review', 'stars'; choose one with --text-column"
    ):
        _read(path)
    with pytest.raises(AigcError, match=r"no column 'label'.*--label-column"):
        _read(path, text_column="review", label_column="label")


def test_read_csv_short_row_reports_line_or_is_skipped(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("text,label\ngood one,pos\nmissing label\nother,neg\n", encoding="utf-8")
    with pytest.raises(AigcError, match="line 3 has 1 fields.*--skip-bad-lines"):
        _read(path, label_column="label")
    records, stats = _read(path, label_column="label", skip_bad_lines=True)
    assert records == [("good one", "pos"), ("other", "neg")]
    assert stats.bad_lines_skipped == 1


def test_read_csv_strips_byte_order_mark(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufefftext\nhello\n".encode("utf-8"))
    assert _read(path)[0] == [("hello", None)]


def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_jsonl_fields_and_numeric_labels(tmp_path):
    path = _write_jsonl(
        tmp_path / "d.jsonl", [json.dumps({"body": "hi", "y": 1}), "", json.dumps({"body": "yo", "y": 0})]
    )
    records, _ = _read(path, text_column="body", label_column="y")
    assert records == [("hi", "1"), ("yo", "0")]


def test_read_jsonl_malformed_line_reports_line_number(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", ['{"text": "ok"}', '{"text": broken', '{"text": "fine"}'])
    with pytest.raises(AigcError, match=r"malformed JSON on line 2 .*--skip-bad-lines"):
        _read(path)
    records, stats = _read(path, skip_bad_lines=True)
    assert records == [("ok", None), ("fine", None)]
    assert stats.bad_lines_skipped == 1


def test_read_jsonl_missing_field_lists_fields(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", ['{"content": "ok", "meta": 1}'])
    with pytest.raises(
        AigcError, match=r"line 1 has no field 'text'; fields there: 'content', 'meta'; choose one with --text-field"
    ):
        _read(path)


def test_read_parquet_columns_and_nulls(tmp_path):
    table = pa.table({"text": ["one", None, "three"], "label": ["a", "b", "a"]})
    pq.write_table(table, tmp_path / "d.parquet")
    records, _ = _read(tmp_path / "d.parquet", label_column="label")
    assert records == [("one", "a"), ("", "b"), ("three", "a")]
    with pytest.raises(AigcError, match=r"no column 'body'; columns there: 'text', 'label'"):
        _read(tmp_path / "d.parquet", text_column="body")


def test_read_parquet_rejects_non_parquet_bytes(tmp_path):
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(AigcError, match="cannot read .* as Parquet"):
        _read(tmp_path / "fake.parquet")


@pytest.mark.parametrize("name, first_words", [("imdb", "I rented I AM CURIOUS-YELLOW"), ("rotten-tomatoes", None)])
def test_read_builtin_sources_map_labels_to_pos_neg(name, first_words):
    source = resolve_source(name)
    records = []
    for record in read_source(source, PrepareConfig(), ReadStats()):
        records.append(record)
        if len(records) == 50:
            break
    if first_words:
        assert records[0][0].startswith(first_words)
    assert {label for _, label in records} <= {"pos", "neg"}
    assert len(source_sha256(source)) == 64


def test_source_sha256_changes_with_content_and_folder_names(tmp_path):
    (tmp_path / "a.txt").write_text("same")
    first = source_sha256(resolve_source(str(tmp_path)))
    (tmp_path / "a.txt").rename(tmp_path / "b.txt")
    assert source_sha256(resolve_source(str(tmp_path))) != first
