"""WER/CER against hand-computed values, normalisation, and the table/CSV layout."""
import csv
import math

import pytest

from mome.evaluation import tables
from mome.evaluation.wer import normalize, score_corpus, score_utterance

# A fixed hypothesis set, errors counted by hand (S = substitution, D = deletion, I = insertion):
REFS = [
    "the cat sat on the mat",  # 6 words
    "Hello, world!",  # 2 words ("hello world" after stripping)
    "don't stop",  # 2 words
    "a b c d e f g h i j",  # 10 words
    "yes",  # 1 word
]
HYPS = [
    "The cat  sat on   mat",  # 1 D (case and spaces do not count)
    "hello world",  # stripped: 0; unstripped: "hello," -> hello, "world!" -> world = 2 S
    "do not stop",  # don't -> do (S), + not (I) = 2
    "a b c d e f g h i j",  # 0
    "no no",  # yes -> no (S), + no (I) = 2
]


def test_wer_hand_computed_with_punctuation_stripping():
    corpus, utts = score_corpus(REFS, HYPS, strip_punctuation=True)
    assert [u.word_errors for u in utts] == [1, 0, 2, 0, 2]
    assert [u.ref_words for u in utts] == [6, 2, 2, 10, 1]
    assert (corpus.word_errors, corpus.ref_words) == (5, 21)
    assert corpus.wer == pytest.approx(5 / 21)
    assert (corpus.substitutions, corpus.deletions, corpus.insertions) == (2, 1, 2)
    # corpus level, not the mean of per-utterance rates (which would be (1/6 + 0 + 1 + 0 + 2) / 5 = 0.633)
    mean_of_utts = sum(u.wer for u in utts) / len(utts)
    assert mean_of_utts == pytest.approx((1 / 6 + 1 + 2) / 5)
    assert not math.isclose(corpus.wer, mean_of_utts)


def test_wer_hand_computed_without_punctuation_stripping():
    corpus, utts = score_corpus(REFS, HYPS, strip_punctuation=False)
    assert [u.word_errors for u in utts] == [1, 2, 2, 0, 2]
    assert corpus.wer == pytest.approx(7 / 21)


def test_cer_hand_computed():
    corpus, utts = score_corpus(["hello world", "ab"], ["hallo world", "abc"])
    assert [u.char_errors for u in utts] == [1, 1]
    assert [u.ref_chars for u in utts] == [11, 2]
    assert corpus.cer == pytest.approx(2 / 13)


def test_normalize():
    assert normalize("  Well-known 'quoted'   DON'T  stop. ") == "well known quoted don't stop"
    assert normalize("  Well-known 'quoted' ", strip_punctuation=False) == "well-known 'quoted'"
    assert normalize("Don\u2019t") == "don't"


def test_empty_hypothesis_and_empty_reference():
    u = score_utterance("u1", "one two three", "")
    assert (u.word_errors, u.deletions, u.ref_words) == (3, 3, 3)
    with pytest.raises(ValueError, match="u2.*empty"):
        score_utterance("u2", " ?! ", "x")


def _rec(method, scale, snr, wer, judge=False):
    return dict(method=method, scale=scale, snr=snr, wer=wer, cer=wer / 2, judge=judge,
                task=scale.split(":")[0] if ":" in scale else "asr")


def test_metric_table_layout(tmp_path):
    recs = [
        _rec("mome", "avsr:4x2", "0", 0.30),
        _rec("mome", "avsr:4x2", "clean", 0.10),
        _rec("mome", "avsr:4x2", "-5", 0.50),
        _rec("mome", "asr:16", "clean", 0.20),
        _rec("whisper-tiny.en (judge)", "full", "clean", 0.05, judge=True),
        _rec("whisper-tiny.en (judge)", "full", "-5", 0.90, judge=True),
        _rec("llama_avsr", "avsr:4x2", "clean", 0.123),
    ]
    header, rows = tables.metric_table(recs, "wer")
    assert header == ["Method", "Scale", "clean", "0 dB", "-5 dB"]
    assert rows == [
        ["mome", "avsr:4x2", "10.0", "30.0", "50.0"],
        ["mome", "asr:16", "20.0", "–", "–"],
        ["llama_avsr", "avsr:4x2", "12.3", "–", "–"],
        ["whisper-tiny.en (judge)", "full", "5.0", "–", "90.0"],
    ]
    md = tables.to_markdown(header, rows).splitlines()
    assert md[0] == "| Method | Scale | clean | 0 dB | -5 dB |"
    assert md[1] == "|---|---|---|---|---|"
    assert md[2] == "| mome | avsr:4x2 | 10.0 | 30.0 | 50.0 |"
    paths = tables.write_tables(tmp_path, recs, cost=[], title="t")
    with open(paths["wer_csv"]) as f:
        assert list(csv.reader(f)) == [header] + rows
    with open(paths["cer_csv"]) as f:
        assert list(csv.reader(f))[1] == ["mome", "avsr:4x2", "5.0", "15.0", "25.0"]
    text = paths["markdown"].read_text()
    assert "## WER (%)" in text and "## CER (%)" in text and "| mome | asr:16 | 20.0 | – | – |" in text


def test_snr_order_and_labels():
    assert sorted(["-5", "2.5", "clean", "5", "0", "-2.5"], key=tables.snr_sort_key) == [
        "clean", "5", "2.5", "0", "-2.5", "-5"]
    assert [tables.snr_label(s) for s in ("clean", "5.0", 5, "-2.50", "inf")] == ["clean", "5", "5", "-2.5", "clean"]
