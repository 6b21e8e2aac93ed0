"""Reference metrics come from sacrebleu / rouge-score; the references file is validated line by line."""

import json

import numpy as np
import pytest

from aigc.artifacts.dataset import write_split
from aigc.errors import AigcError
from aigc.evaluate.reference import Pair, held_out_pairs, read_references, reference_metrics


def test_reference_metrics_perfect_and_disjoint():
    refs = ["the acting is wonderful and the story moving", "a dull plot with terrible dialogue"]
    perfect = reference_metrics(refs, refs)
    assert perfect["bleu"] == pytest.approx(100.0)
    assert perfect["chrf"] == pytest.approx(100.0)
    assert perfect["rouge1"] == perfect["rougeL"] == pytest.approx(1.0)
    disjoint = reference_metrics(["zebra quantum kettle", "violet engine snow"], refs)
    assert disjoint["bleu"] < 1.0 and disjoint["rouge1"] == 0.0
    assert perfect["num_pairs"] == 2


def test_reference_metrics_rouge_counts_chinese_words():
    # rouge-score's own tokenizer drops non-ASCII text; ours keeps each CJK character.
    result = reference_metrics(["这部电影很好"], ["这部电影很好看"])
    assert 0.5 < result["rouge1"] < 1.0


def test_read_references_reports_bad_line_number(tmp_path):
    path = tmp_path / "refs.jsonl"
    path.write_text(json.dumps({"prompt": "a", "reference": "b"}) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(AigcError, match="line 2 is not valid JSON"):
        read_references(path)
    path.write_text(json.dumps({"prompt": "a"}) + "\n", encoding="utf-8")
    with pytest.raises(AigcError, match="line 1 needs string fields"):
        read_references(path)


def test_read_references_reads_pairs_and_optional_label(tmp_path):
    path = tmp_path / "refs.jsonl"
    rows = [{"prompt": "Once", "reference": "upon a time"}, {"prompt": "It", "reference": "was", "label": "pos"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert read_references(path) == [Pair("Once", "upon a time"), Pair("It", "was", "pos")]
    with pytest.raises(AigcError, match="not found"):
        read_references(tmp_path / "missing.jsonl")


def test_held_out_pairs_split_documents_at_prompt_tokens(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    texts = ["a wonderful film with a moving story and great acting " * 3, "short"]
    docs = [[tok.label_id("pos")] + tok.encode(t) + [tok.eot_id] for t in texts]
    (tmp_path / "dataset.json").write_text(json.dumps({"token_dtype": "uint16"}), encoding="utf-8")
    write_split(tmp_path, "val", docs, [0, 1], tok.vocab_size)
    from aigc.artifacts.dataset import open_split

    pairs = held_out_pairs(
        open_split(tmp_path, "val"), tok, ["pos", "neg"], count=5, prompt_tokens=4, reference_tokens=6, seed=0
    )
    assert len(pairs) == 1  # the short document has no room for a continuation
    content = np.array(docs[0][1:-1])
    assert pairs[0].prompt == tok.decode(content[:4].tolist())
    assert pairs[0].reference == tok.decode(content[4:10].tolist())
    assert pairs[0].label == "pos"
