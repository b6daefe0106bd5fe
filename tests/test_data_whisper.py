"""The synthetic speech is intelligible: the pretrained Whisper tiny.en transcribes it at a corpus WER below 0.30."""
import pytest

from mome.data.intelligibility import HOMOPHONES, corpus_wer, normalize_transcript, transcribe_split
from tests.data_fixtures import session_dir


def _whisper_available() -> bool:
    try:
        from mome.pretrained import resolve

        resolve("whisper-tiny.en")
        return True
    except Exception:  # noqa: BLE001 - no converted model and no way to make one
        return False


def test_normalizer():
    assert normalize_transcript("Place blue at F2, now!") == "place blue at f two now"
    assert normalize_transcript("Take it at 29.") == "take it at two nine"
    assert normalize_transcript("Move it near age for") == "move it near h four"
    assert normalize_transcript("Move it near age for", homophones=False) == "move it near age for"
    from mome.data.grammar import VOCABULARY

    assert not set(HOMOPHONES) & set(VOCABULARY)  # mapping never turns a right word wrong
    assert corpus_wer(["a b c d"], ["a b x"]) == 0.5


@pytest.mark.skipif(not _whisper_available(), reason="Whisper tiny.en could not be prepared (mome.pretrained)")
def test_whisper_understands_the_generated_test_split():
    from mome.config import SynthConfig
    from mome.data.synth import generate_corpus

    # a small corpus whose test split holds 24 utterances of the 12 default speakers (measured: WER 0.15)
    spec = SynthConfig(num=30, seed=1, num_speakers=12, val_fraction=0.0, test_fraction=0.8)
    root = generate_corpus(session_dir() / "whisper-corpus", spec, workers=2, progress=False)
    ids, refs, hyps = transcribe_split(root, root / "test.csv")
    assert len(refs) == 24
    wer = corpus_wer(refs, hyps)
    assert wer < 0.30, "\n".join(f"{r} | {h}" for r, h in zip(refs, hyps)) + f"\nWER {wer:.3f}"
