"""WER/CER against hand-computed values, and the normalisation."""
import math

import pytest

from mome.metrics.wer import normalize, score_corpus, score_utterance

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


def test_spell_numbers():
    from mome.metrics.wer import number_to_words, spell_numbers

    assert spell_numbers("But we're in C8.") == "But we're in C eight."
    assert spell_numbers("In 2025, 1,000 people") == "In two thousand twenty five, one thousand people"
    assert spell_numbers("the 21st and 12th, 3rd") == "the twenty first and twelfth, third"
    assert spell_numbers("2.5 dB, 007, 1,200,300") == (
        "two point five dB, zero zero seven, one million two hundred thousand three hundred")
    assert [number_to_words(n) for n in (0, 13, 40, 99, 100, 101, 110)] == [
        "zero", "thirteen", "forty", "ninety nine", "one hundred", "one hundred one", "one hundred ten"]
    # scored against a spelled-out reference, the digit form is then no error
    assert score_utterance("u", "put blue in c eight", spell_numbers("Put blue in C8.")).word_errors == 0
