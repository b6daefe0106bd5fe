"""Noise: exact-SNR mixing, babble from the corpus, white and file noise, seeded evaluation noise."""
import numpy as np
import pytest
import torch

from mome.data import build_dataset
from mome.data.noise import (NoiseSource, WhiteNoise, achieved_snr, build_noise_source, eval_rng, file_noise,
                             mix_at_snr)
from tests.data_fixtures import data_config, tiny_corpus


@pytest.mark.parametrize("snr", [-5.0, -2.5, 0.0, 2.5, 7.0, 20.0])
def test_mix_at_snr_is_exact(snr):
    rng = np.random.default_rng(int(snr * 10) + 100)
    speech = (rng.standard_normal(32000) * np.hanning(32000)).astype(np.float32)
    noise = (3.0 * rng.standard_normal(32000)).astype(np.float32)
    mixed = mix_at_snr(speech, noise, snr)
    assert mixed.dtype == np.float32 and mixed.shape == speech.shape
    assert abs(achieved_snr(speech, mixed) - snr) < 0.1
    t = mix_at_snr(torch.from_numpy(speech), torch.from_numpy(noise), snr)
    assert isinstance(t, torch.Tensor) and torch.allclose(t, torch.from_numpy(mixed))


def test_mix_rejects_bad_noise():
    with pytest.raises(ValueError, match="same shape"):
        mix_at_snr(np.ones(10), np.ones(11), 0)
    with pytest.raises(ValueError, match="silent"):
        mix_at_snr(np.ones(10), np.zeros(10), 0)
    assert np.array_equal(mix_at_snr(np.zeros(10), np.ones(10), 0), np.zeros(10))


def test_babble_from_corpus_is_speech_like_and_cached():
    cfg = data_config(tiny_corpus())
    babble = build_noise_source(cfg, "babble")
    assert babble.name.startswith("babble") and len(babble.track) == 60 * 16000
    assert abs(float(np.sqrt(np.mean(babble.track.astype(np.float64) ** 2))) - 1.0) < 1e-3
    # many talkers: the envelope fluctuates less than one talker's but is not stationary white noise
    frames = babble.track[: 16000 * 10].reshape(-1, 640)
    env = np.log(np.mean(frames ** 2, axis=1) + 1e-9)
    assert 0.1 < env.std() < 3.0
    again = build_noise_source(cfg, "babble")  # from the cached wav
    assert np.allclose(again.track, babble.track, atol=1e-3)


def test_file_and_white_noise(tmp_path):
    rng = np.random.default_rng(0)
    noise = (0.3 * np.sin(np.arange(8000 * 3) * 0.05) + 0.05 * rng.standard_normal(8000 * 3)).astype(np.float32)
    path = tmp_path / "noise8k.wav"
    import soundfile as sf

    sf.write(str(path), noise, 8000)  # another rate: resampled to 16 kHz
    src = file_noise(path)
    assert len(src.track) == 2 * len(noise)
    seg = src.segment(100000, np.random.default_rng(1))  # longer than the track: wraps
    assert seg.shape == (100000,)
    cfg = data_config(tiny_corpus(), f"data.noise.file={path}", "data.noise.type=file")
    assert build_noise_source(cfg).name.startswith("file:")
    with pytest.raises(ValueError, match="data.noise.file"):
        build_noise_source(data_config(tiny_corpus(), "data.noise.type=file"))
    white = WhiteNoise()
    a, b = white.segment(1000, eval_rng(0, "x")), white.segment(1000, eval_rng(0, "x"))
    assert np.array_equal(a, b) and not np.array_equal(a, white.segment(1000, eval_rng(0, "y")))
    with pytest.raises(ValueError, match="silent"):
        NoiseSource(np.zeros(10), "zeros")


@pytest.mark.parametrize("noise_type", ["babble", "white"])
def test_eval_noise_snr_and_repeatability(noise_type):
    cfg = data_config(tiny_corpus(), "data.transforms.normalize_waveform=false")
    clean = build_dataset(cfg, "test", train=False)
    noisy = build_dataset(cfg, "test", train=False, snr=0, noise_type=noise_type)
    noisy_again = build_dataset(cfg, "test", train=False, snr=0, noise_type=noise_type)
    other = build_dataset(cfg, "test", train=False, snr=5, noise_type=noise_type)
    for i in range(len(clean)):
        s = clean[i]["audio"].numpy()
        n0 = noisy[i]["audio"].numpy()
        assert abs(achieved_snr(s, n0) - 0.0) < 0.1
        assert np.array_equal(n0, noisy_again[i]["audio"].numpy())  # same SNR, same noise
        n5 = other[i]["audio"].numpy()
        assert abs(achieved_snr(s, n5) - 5.0) < 0.1
        # the same noise at another level: (n5 - s) is a scaled copy of (n0 - s)
        d0, d5 = n0.astype(np.float64) - s, n5.astype(np.float64) - s
        assert abs(np.corrcoef(d0, d5)[0, 1]) > 0.999


def test_training_noise_draws_snrs_from_the_list():
    cfg = data_config(tiny_corpus(), "data.transforms.normalize_waveform=false", 'data.transforms.train_snrs=["0"]',
                      "data.transforms.audio_mask_window=0")
    ds = build_dataset(cfg, "train", train=True)
    frames, audio = ds.load(0)
    torch.manual_seed(0)
    a = ds[0]["audio"].numpy()
    b = ds[0]["audio"].numpy()
    assert abs(achieved_snr(audio, a)) < 0.1 and abs(achieved_snr(audio, b)) < 0.1
    assert not np.array_equal(a, b)  # a fresh noise offset each time in training
    fixed = build_dataset(cfg, "train", train=True, snr=5)  # a fixed SNR overrides the training list
    torch.manual_seed(0)
    assert abs(achieved_snr(audio, fixed[0]["audio"].numpy()) - 5.0) < 0.1
    cfg = data_config(tiny_corpus(), "data.transforms.normalize_waveform=false", 'data.transforms.train_snrs=["clean"]',
                      "data.transforms.audio_mask_window=0")
    clean = build_dataset(cfg, "train", train=True)[0]["audio"].numpy()
    assert np.array_equal(clean, audio)
