"""The comparison table marks the best run per metric; the privacy check reuses prepare's redactor."""

from aigc.evaluate.compare import best_index, comparison_rows, comparison_table
from aigc.evaluate.describe import fmt
from aigc.evaluate.privacy import redaction_check


def test_comparison_rows_keep_measured_metrics_only():
    a = {"language_modelling": {"split": {"loss": 3.0}}, "control": {"accuracy": 0.9}}
    b = {"language_modelling": {"split": {"loss": 2.0}}, "control": {"skipped": "unlabelled"}}
    rows = comparison_rows([a, b])
    assert [name for name, _, _ in rows] == ["val loss", "control accuracy"]
    assert rows[1][2] == [0.9, None]


def test_comparison_table_marks_best_by_direction():
    rows = [("val loss", False, [3.0, 2.0]), ("BLEU", True, [5.0, 1.0]), ("chrF", True, [None, 4.0])]
    lines = comparison_table(["gpt", "lstm"], rows).splitlines()
    assert lines[0].split() == ["metric", "gpt", "lstm"]
    assert lines[2].split() == ["val", "loss", "↓", "3", "2*"]
    assert lines[3].split() == ["BLEU", "↑", "5*", "1"]
    assert lines[4].split() == ["chrF", "↑", "–", "4"]  # a single value is not "best"
    assert best_index([None, None], True) is None
    assert best_index([0.0, 0.0, 1.0], False) is None  # a tie for best marks nobody


def test_fmt_numbers_for_people():
    assert fmt(None) == "–" and fmt(1234567) == "1,234,567" and fmt(0.123456) == "0.1235" and fmt(True) == "yes"


def test_redaction_check_flags_personal_data_and_counts_placeholders():
    texts = ["write to jane.doe@example.com today", "call +44 20 7946 0958", "mail <EMAIL> please", "a fine film"]
    result = redaction_check(texts)
    assert result["found"]["EMAIL"] == 1 and result["found"]["PHONE"] == 1
    assert result["total_found"] == 2 and result["flagged_texts"] == [0, 1]
    assert result["placeholders_generated"]["<EMAIL>"] == 1
    clean = redaction_check(["Rated 7/10 in 2023, $12.99"])  # ratings, years and prices are not personal data
    assert clean["total_found"] == 0 and clean["summary"].startswith("Privacy: no e-mail")
