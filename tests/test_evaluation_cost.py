"""FLOPs accounting against published numbers and the project's parameter checks (docs/method.md#parameters)."""
import pytest
from transformers import LlamaConfig

from mome.config import load_config
from mome.evaluation.cost import LLMShape, adapter_flops_per_token, llm_flops, media_tokens_per_second
from mome.scales import Scale

LLAMA_31_8B = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256)
LLAMA_32_3B = LlamaConfig(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                          num_key_value_heads=8, head_dim=128, vocab_size=128256)


@pytest.mark.parametrize("tokens,tflops", [(757, 11.40), (257, 3.87), (182, 2.74), (163, 2.46), (88, 1.33)])
def test_prompt_flops_match_llama_mtsk_table4(tokens, tflops):
    # Llama-MTSK Table 4 (Llama 3.1-8B, 10 s clip): forward FLOPs of the prompt, linear layers + LM head per token.
    shape = LLMShape.from_hf_config(LLAMA_31_8B)
    f = llm_flops(shape, tokens, include_attention=False, logits_positions=None)["prefill_flops"]
    assert f / 1e12 == pytest.approx(tflops, rel=0.01)


def test_adapter_flops_equal_twice_the_active_parameters():
    shape = LLMShape.from_hf_config(LLAMA_32_3B)
    mome = load_config(None, ["model.method=mome"]).model  # MoME-23/4, 1 shared, bottleneck 12
    # 12,732,048 active parameters (docs/method.md#parameters) minus the experts' biases (28 layers x 5 experts x (12 + 3072))
    assert adapter_flops_per_token(mome, shape) == 2 * (12_732_048 - 28 * 5 * (12 + 3072))
    lora = load_config(None, ["model.method=llama_avsr"]).model  # Q+V LoRA, reduction 32 -> rank 96
    assert adapter_flops_per_token(lora, shape) == 2 * 27_525_120
    mss = load_config(None, ["model.method=mtsk_mss"]).model  # global + scale-specific adapter both active
    assert adapter_flops_per_token(mss, shape) == 4 * 27_525_120


def test_attention_and_decode_terms():
    shape = LLMShape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, head_dim=4, vocab=10)
    lin = 2 * 2 * (8 * 8 + 2 * 8 * 4 + 8 * 8 + 3 * 8 * 16)
    f = llm_flops(shape, 3, adapter_per_token=5)
    assert f["prefill_flops"] == 3 * (lin + 5) + 2 * 8 * 10 + 4 * 2 * 4 * 2 * (3 * 4 // 2)
    assert f["decode_flops_per_token"] == lin + 5 + 2 * 8 * 10 + 4 * 2 * 4 * 2 * 4


def test_media_tokens_per_second():
    assert media_tokens_per_second(Scale("avsr", 4, 2)) == 50 / 4 + 25 / 2
    assert media_tokens_per_second(Scale("asr", audio_rate=16)) == 50 / 16
    assert media_tokens_per_second(Scale("vsr", video_rate=5)) == 5
