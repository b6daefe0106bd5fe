"""What would skew results on real LRS2/LRS3 data: colour video, Whisper input length, test-split filtering,
WER normalisation and the babble noise recording. Each test fails without its fix."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.clip_fixtures import write_clip
from tests.data_fixtures import data_config, tiny_corpus

REPO = Path(__file__).resolve().parents[1]
PAPER_RECIPES = sorted((REPO / "configs").glob("*_llama*.yaml"))  # the paper recipes (not demo, compare_demo)


# ---- video colour ---------------------------------------------------------------------------------------------

def test_read_video_gives_bt601_luminance_of_colour_frames(tmp_path):
    from mome.data.media import luminance, read_video

    colours = np.array([[200, 40, 60], [30, 200, 90]], np.uint8)
    frames = np.zeros((6, 64, 64, 3), np.uint8)
    frames[:, :, :32], frames[:, :, 32:] = colours[0], colours[1]
    path = write_clip(tmp_path / "colour.mp4", frames, fps=25)
    got = read_video(path)
    assert got.shape == (6, 64, 64) and got.dtype == np.uint8
    expected = 0.299 * colours[:, 0] + 0.587 * colours[:, 1] + 0.114 * colours[:, 2]  # 90.1, 136.6
    # inside each half (away from the chroma-subsampled edge): luminance, not the red channel (200 / 30)
    assert abs(float(got[:, 8:56, 4:24].mean()) - expected[0]) < 3
    assert abs(float(got[:, 8:56, 40:60].mean()) - expected[1]) < 3
    grey = np.full((2, 4, 4, 3), 117, np.uint8)
    assert np.array_equal(luminance(grey), grey[..., 0])  # grey frames (the synthetic corpus) are unchanged


def test_video_transform_turns_rgb_into_luminance():
    from mome.config import load_config
    from mome.data.transforms import VideoTransform

    tcfg = load_config().data.transforms
    rgb = np.zeros((2, 96, 96, 3), np.uint8)
    rgb[..., 0] = 255  # pure red: luminance 76, channel mean 85
    x = VideoTransform(tcfg, train=False)(rgb, np.random.default_rng(0))
    assert np.allclose(x.numpy() * tcfg.video_std + tcfg.video_mean, 76 / 255, atol=1e-6)


def test_synthetic_grey_corpus_reads_back_unchanged(tmp_path):
    """The demo's corpus is grey: luminance equals any channel, so its frames (and the front end's input
    normalisation with the same 0.421 / 0.165 statistics) are exactly what they were."""
    from mome.data.manifest import read_manifest
    from mome.data.media import read_video

    root = tiny_corpus()
    row = read_manifest(root / "test.csv")[0]
    import decord

    rgb = decord.VideoReader(str(row.video_path(root)), ctx=decord.cpu(0), num_threads=1)
    rgb = rgb.get_batch(list(range(len(rgb)))).asnumpy()
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
    assert np.array_equal(read_video(row.video_path(root)), rgb[..., 0])


# ---- Whisper input length and WER normalisation: the paper recipes follow the reference --------------------------

@pytest.mark.parametrize("recipe", PAPER_RECIPES, ids=lambda p: p.stem)
def test_paper_recipes_use_the_reference_protocol(recipe):
    from mome.config import load_config

    cfg = load_config(recipe)
    assert cfg.model.audio_encoder.pad_to_30s is True  # stock Whisper: every clip padded to 30 s
    assert cfg.eval.strip_punctuation is False  # WER after lowercase + split on whitespace
    assert cfg.data.transforms.video_mean == 0.421 and cfg.data.transforms.video_std == 0.165


def test_demo_keeps_the_cropped_whisper_input():
    from mome.config import load_config

    assert load_config(REPO / "configs" / "demo.yaml").model.audio_encoder.pad_to_30s is False


def test_reference_wer_normalisation_is_lowercase_and_split():
    from mome.metrics.wer import normalisation_name, normalize, wer

    # no Unicode folding or punctuation stripping in the reference protocol
    assert normalize("  Ｈｅｌｌｏ,  World!\tagain ", strip_punctuation=False) == "ｈｅｌｌｏ, world! again"
    assert wer(["hello world"], ["Ｈｅｌｌｏ world"], strip_punctuation=False) == 0.5
    assert wer(["hello world"], ["Ｈｅｌｌｏ world"], strip_punctuation=True) == 0.0
    assert wer(["hello world"], ["hello, world"], strip_punctuation=False) == 0.5
    assert "lowercase, split on whitespace" in normalisation_name(False)
    assert "punctuation stripped" in normalisation_name(True)


# ---- the test split is never filtered ------------------------------------------------------------------------

def test_max_duration_filters_training_only():
    from mome.data.dataset import build_dataset
    from mome.data.manifest import read_manifest

    root = tiny_corpus()
    cfg = data_config(root, "data.max_duration_s=0.5", "data.transforms.train_snrs=[clean]")
    assert len(build_dataset(cfg, "train")) == 0  # every training utterance is longer than 0.5 s
    for split in ("val", "test"):
        assert len(build_dataset(cfg, split)) == len(read_manifest(root / f"{split}.csv")) > 0


def test_results_table_says_utterances_normalisation_and_noise(tmp_path):
    from mome.evaluation.run import protocol_notes
    from mome.evaluation.tables import write_tables

    rec = {"method": "m", "model_method": "mome", "judge": False, "task": "avsr", "scale": "avsr:4x2", "snr": "clean",
           "num_utterances": 1321, "wer": 0.1, "cer": 0.05}
    meta = {"split": "test", "max_utterances": 0, "snrs": ["clean"], "noise_seed": 0,
            "normalisation": {"name": "reference (lowercase, split on whitespace)"},
            "noise": "babble (babble_noise.wav)"}
    write_tables(tmp_path, [rec], [], notes=protocol_notes([rec], meta))
    md = (tmp_path / "results.md").read_text()
    assert "test, 1321 utterances (every utterance of the split)" in md
    assert "WER normalisation: reference (lowercase, split on whitespace)" in md
    assert "Noise: babble (babble_noise.wav)" in md


# ---- babble from a given recording ----------------------------------------------------------------------------

def _noise_wav(path: Path, seconds: float = 3.0) -> Path:
    import soundfile as sf

    rng = np.random.default_rng(1)
    sf.write(str(path), (0.1 * rng.standard_normal(int(22050 * seconds))).astype(np.float32), 22050)
    return path


def test_babble_from_a_noise_file_in_training_and_evaluation(tmp_path):
    from mome.data.dataset import build_dataset
    from mome.data.media import read_audio
    from mome.data.noise import build_noise_source, noise_name

    wav = _noise_wav(tmp_path / "babble_noise.wav")
    cfg = data_config(tiny_corpus(), f"data.noise.file={wav}")
    src = build_noise_source(cfg)  # type babble (the default) + a file: the file is the babble
    track = read_audio(wav)
    assert src.name == "babble:babble_noise.wav" and len(src.track) == len(track)
    assert np.allclose(src.track, track / np.sqrt(np.mean(track.astype(np.float64) ** 2)), atol=1e-5)
    train = build_dataset(cfg, "train")  # train_snrs has noisy levels
    test = build_dataset(cfg, "test", train=False, snr=0, noise_type="babble")
    assert train.audio_transform.noise.name == test.audio_transform.noise.name == "babble:babble_noise.wav"
    assert noise_name(cfg, "babble") == "babble (babble_noise.wav)"
    assert "training speech" in noise_name(data_config(tiny_corpus()), "babble")


def test_missing_or_unreadable_noise_file_is_a_one_line_error_at_start(tmp_path, capsys):
    import train as train_entry
    from mome.data.noise import NoiseFileError, check_noise_file

    bad = tmp_path / "babble_noise.wav"
    bad.write_bytes(b"not audio at all" * 10)
    for path, problem in ((tmp_path / "nope.wav", "no such noise file"), (bad, "not a readable audio file")):
        cfg = data_config(tiny_corpus(), f"data.noise.file={path}")
        with pytest.raises(NoiseFileError, match=problem) as info:
            check_noise_file(cfg)
        assert "\n" not in str(info.value) and str(path) in str(info.value)
        # train.py stops before building any model (the backbone named here does not even exist)
        with pytest.raises(SystemExit) as stop:
            train_entry.main([f"data.noise.file={path}", "model.llm.name=/nonexistent/llm"])
        assert str(stop.value).startswith("config error: data.noise.file:") and problem in str(stop.value)
    check_noise_file(data_config(tiny_corpus(), f"data.noise.file={_noise_wav(tmp_path / 'ok.wav')}"))
