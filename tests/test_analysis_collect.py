"""Hidden-state capture and cross-rate token similarity."""
import numpy as np
import pytest
import torch

from analysis import collect
from analysis.trace import ROLE_CODE
from mome.scales import Scale

A, V, B_, I, T, P = (ROLE_CODE[r] for r in ("audio", "video", "boundary", "instruction", "transcript", "pad"))


def test_hidden_states_capture_embeddings_and_layer_outputs():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    llm = LlamaForCausalLM(cfg).eval()
    x = torch.randn(2, 5, 16)
    with collect.HiddenStates(llm, [-1, 0, 1]) as hs, torch.no_grad():
        out = llm(inputs_embeds=x, output_hidden_states=True)
    torch.testing.assert_close(hs.states[-1], x)
    torch.testing.assert_close(hs.states[0], out.hidden_states[1], rtol=0, atol=0)
    with torch.no_grad():  # HF's last hidden state has the final norm applied; ours is the raw layer output
        torch.testing.assert_close(llm.model.norm(hs.states[1]), out.hidden_states[2])
    assert len(llm.model.layers[0]._forward_pre_hooks) == 0  # hooks removed
    with pytest.raises(ValueError, match="out of range"):
        collect.HiddenStates(llm, [2])


def test_similarity_matrices_pair_rates_within_a_modality():
    d = 8
    rng = np.random.default_rng(0)
    frames = rng.normal(size=(20, d))

    def pooled(rate):  # average pooling of the same "encoder frames", as the model's compression does
        n = 20 // rate
        return frames[: n * rate].reshape(n, rate, d).mean(1)

    rows = {}
    for s in (Scale("avsr", 4, 2), Scale("avsr", 4, 5), Scale("avsr", 2, 5)):
        a, v = pooled(s.audio_rate), pooled(s.video_rate)
        roles = np.array([B_] + [A] * len(a) + [V] * len(v) + [T])
        rows[s] = (roles, np.concatenate([np.zeros((1, d)), a, v, np.ones((1, d))]))
    out = collect.similarity_matrices(rows, "projector", "u")
    assert [(m["modality"], m["coarse_rate"], m["fine_rate"]) for m in out] == [("audio", 4, 2), ("video", 5, 2)]
    assert out[0]["sim"].shape == (5, 10) and out[1]["sim"].shape == (4, 10)
    # pooled tokens of the same frames: each coarse token is most similar to a fine token inside its span
    assert out[0]["summary"]["argmax_in_span"] == 1.0
    assert out[0]["summary"]["band_mean"] > out[0]["summary"]["off_band_mean"]
