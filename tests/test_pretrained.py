"""Offline pretrained models: conversion correctness (Whisper transcribes, SmolLM2 answers, weights and logits
match their sources), cache behaviour (atomic, concurrent, second run fast), resolution rules and errors."""
import re
import socket
import subprocess
import sys
from pathlib import Path

import jiwer
import numpy as np
import pytest
import torch
from safetensors import safe_open

from mome.config import cache_dir
from mome.data.espeak import ESpeak
from mome.pretrained import REGISTRY, load_llm, load_whisper, prepare, prepare_all, resolve
from mome.pretrained.smollm2 import gguf_source
from mome.pretrained.whisper_ct2 import CT2FormatError, hf_state_dict, read_ct2
from mome.pretrained.registry import _whisper_dir

REPO = Path(__file__).resolve().parents[1]

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "she sells sea shells by the sea shore",
    "please call stella and ask her to bring these things",
    "a large red car is parked near the old house",
    "we will meet at the station tomorrow morning",
    "the weather is very cold today",
    "my brother plays football every weekend",
    "open the window and let the fresh air in",
]


@pytest.fixture(scope="session")
def cache():
    """The project cache ($MOME_CACHE or ~/.cache/mome) with both registry models prepared (once per machine)."""
    prepare_all()
    return cache_dir()


@pytest.fixture(scope="session")
def smollm2(cache):
    return load_llm("smollm2-135m")


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


class _NoNetwork:
    """Records (and refuses) every attempt to open a network connection."""

    def __init__(self, monkeypatch):
        self.attempts = []
        real_connect = socket.socket.connect

        def connect(sock, address):
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                self.attempts.append(address)
                raise OSError(f"test forbids network access ({address})")
            return real_connect(sock, address)

        monkeypatch.setattr(socket.socket, "connect", connect)


# ---------------------------------------------------------------------------------------------------------------
# Whisper tiny.en


def test_whisper_transcribes_espeak_speech(cache, monkeypatch):
    net = _NoNetwork(monkeypatch)
    model, processor = load_whisper("whisper-tiny.en")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    speech = ESpeak()
    audio = [speech.synthesize(s, voice="en-us").audio for s in SENTENCES]
    features = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        ids = model.generate(features, max_new_tokens=40, num_beams=1, do_sample=False)
    hyps = [_words(h) for h in processor.batch_decode(ids, skip_special_tokens=True)]
    wer = jiwer.wer(SENTENCES, hyps)
    print(f"whisper-tiny.en corpus WER on {len(SENTENCES)} eSpeak sentences: {wer:.3f}", hyps)
    assert wer <= 0.25, (wer, hyps)
    assert net.attempts == []


def test_whisper_weights_are_the_ct2_weights(cache):
    """Spot-check the saved folder against the raw CTranslate2 file, including a split fused QKV."""
    ct2 = read_ct2(_whisper_dir() / "model.bin")
    v = ct2.variables
    folder = resolve("whisper-tiny.en")
    with safe_open(folder / "model.safetensors", "pt") as f:
        def same(hf, arr):
            t = f.get_tensor(hf)
            assert t.dtype == torch.float32 and torch.equal(t, torch.from_numpy(arr.astype(np.float32))), hf

        d = v["encoder/conv1/weight"].shape[0]
        qkv = v["encoder/layer_2/self_attention/linear_0/weight"]
        same("model.encoder.layers.2.self_attn.q_proj.weight", qkv[:d])
        same("model.encoder.layers.2.self_attn.k_proj.weight", qkv[d:2 * d])
        same("model.encoder.layers.2.self_attn.v_proj.weight", qkv[2 * d:])
        kv = v["decoder/layer_3/attention/linear_1/bias"]
        same("model.decoder.layers.3.encoder_attn.v_proj.bias", kv[d:])
        same("model.decoder.layers.3.encoder_attn.out_proj.weight", v["decoder/layer_3/attention/linear_2/weight"])
        same("model.encoder.conv2.weight", v["encoder/conv2/weight"])
        same("model.decoder.embed_tokens.weight", v["decoder/embeddings/weight"])
        same("model.encoder.layers.0.final_layer_norm.bias", v["encoder/layer_0/ffn/layer_norm/beta"])


def test_whisper_converter_rejects_bad_input(tmp_path):
    ct2 = read_ct2(_whisper_dir() / "model.bin")
    assert len(hf_state_dict(ct2)) == 167  # every CTranslate2 weight accounted for

    extra = read_ct2(_whisper_dir() / "model.bin")
    extra.variables["encoder/layer_0/extra/weight"] = np.zeros(3, np.float16)
    with pytest.raises(CT2FormatError, match=r"no Hugging Face counterpart: \['encoder/layer_0/extra/weight'\]"):
        hf_state_dict(extra)

    missing = read_ct2(_whisper_dir() / "model.bin")
    del missing.variables["decoder/layer_1/ffn/linear_1/bias"]
    with pytest.raises(CT2FormatError, match="missing variable 'decoder/layer_1/ffn/linear_1/bias'"):
        hf_state_dict(missing)

    kbias = read_ct2(_whisper_dir() / "model.bin")
    b = kbias.variables["encoder/layer_0/self_attention/linear_0/bias"].copy()
    b[400] = 0.5
    kbias.variables["encoder/layer_0/self_attention/linear_0/bias"] = b
    with pytest.raises(CT2FormatError, match="non-zero key part"):
        hf_state_dict(kbias)

    truncated = tmp_path / "model.bin"
    truncated.write_bytes((_whisper_dir() / "model.bin").read_bytes()[:5000])
    with pytest.raises(CT2FormatError, match=f"{re.escape(str(truncated))}: variable .* runs past the end"):
        read_ct2(truncated)
    truncated.write_bytes(b"\x05\x00\x00\x00")
    with pytest.raises(CT2FormatError, match="binary version 5"):
        read_ct2(truncated)


# ---------------------------------------------------------------------------------------------------------------
# SmolLM2-135M


def test_smollm2_answers_a_factual_question(smollm2):
    model, tokenizer = smollm2
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "paris" in answer.lower(), answer


def test_smollm2_cached_weights_are_the_gguf_weights(cache):
    """Fast check: the cached safetensors equal the GGUF tensors dequantised independently by the gguf package."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    folder, name = gguf_source()
    tensors = {t.name: t for t in GGUFReader(folder / name).tensors}
    pairs = {  # GGUF name -> HF name (q/k are permuted by llama.cpp, so compare others)
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
        "blk.17.ffn_down.weight": "model.layers.17.mlp.down_proj.weight",
        "blk.29.attn_output.weight": "model.layers.29.self_attn.o_proj.weight",
        "blk.3.attn_norm.weight": "model.layers.3.input_layernorm.weight",
        "output_norm.weight": "model.norm.weight",
    }
    with safe_open(resolve("smollm2-135m") / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied to the token embedding
        for g, hf in pairs.items():
            ref = torch.from_numpy(dequantize(tensors[g].data, tensors[g].tensor_type).astype(np.float32))
            got = f.get_tensor(hf)
            assert got.shape == ref.shape and torch.equal(got, ref), hf


@pytest.mark.slow  # the GGUF load dequantises every tensor: ~15 s CPU, much more on a busy machine
def test_smollm2_cached_logits_equal_the_gguf_load(smollm2):
    from mome.pretrained.smollm2 import load_gguf

    model, tokenizer = smollm2
    gguf_model, gguf_tokenizer = load_gguf(torch.float32)
    text = "Whisper listens while the small language model writes the transcript."
    x = tokenizer(text, return_tensors="pt")
    assert torch.equal(x["input_ids"], gguf_tokenizer(text, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        diff = (model(**x).logits - gguf_model(**x).logits).abs().max().item()
    assert diff < 1e-4, diff


# ---------------------------------------------------------------------------------------------------------------
# cache, CLI, resolution


def test_prepare_cli_second_run_reuses_the_cache(cache):
    out = subprocess.run([sys.executable, "-m", "mome.pretrained", "prepare", "--cache-dir", str(cache)],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in REGISTRY:  # nothing converted again (its speed is not a test: ~1.5 s on an idle CPU)
        assert re.search(rf"{re.escape(name)}\s+already prepared", out), out


def test_concurrent_prepare_builds_once_and_atomically(tmp_path):
    cmd = [sys.executable, "-m", "mome.pretrained", "prepare", "whisper-tiny.en", "--cache-dir", str(tmp_path)]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    lines = " ".join(o for o, _ in outs)
    assert lines.count("converted") == 1 and lines.count("already prepared") == 1, lines
    models = tmp_path / "models"
    assert sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock")) == ["whisper-tiny.en"]
    model, processor = load_whisper("whisper-tiny.en", cache_dir=tmp_path)
    assert model.config.vocab_size == len(processor.tokenizer) == 51864
    assert processor.tokenizer.decode([50257, 50362, 383, 2068, 50256]) == \
        "<|startoftranscript|><|notimestamps|> The quick<|endoftext|>"


def test_resolve_rules(cache, tmp_path, monkeypatch):
    net = _NoNetwork(monkeypatch)
    whisper = resolve("whisper-tiny.en")
    assert whisper == cache / "models" / "whisper-tiny.en" and (whisper / "config.json").is_file()
    assert resolve(str(whisper)) == whisper  # a local folder passes through
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model folder"):
        resolve(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"'smollm2-135M' is not a registry name \(smollm2-135m"):
        resolve("smollm2-135M")
    with pytest.raises(FileNotFoundError, match="not an existing local folder"):
        resolve(str(tmp_path / "missing" / "model"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(FileNotFoundError, match="'someorg/some-model' is not in the local Hugging Face cache and "
                                                "HF_HUB_OFFLINE is set"):
        resolve("someorg/some-model", cache_dir=tmp_path)
    with pytest.raises(KeyError, match="unknown pretrained model"):
        prepare("llama-7b")
    assert net.attempts == []
