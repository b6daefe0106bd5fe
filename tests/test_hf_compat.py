"""Every name mome.adapters.hf_compat knows for a transformers internal, exercised one by one."""
import contextlib
import inspect
import warnings

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import ModelOutput

from mome.adapters.hf_compat import CACHE_KWARGS, cache_kwarg, enable_checkpointing, output_cache

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def tiny_llm():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    model.generation_config.eos_token_id = None
    return model


def test_cache_kwarg_is_the_one_the_installed_forward_takes_and_feeds_a_decoding_step():
    llm = tiny_llm()
    name = cache_kwarg(llm)
    assert name in CACHE_KWARGS
    ids = torch.randint(0, 64, (1, 6))
    full = llm(input_ids=ids).logits[:, -1]
    cache = output_cache(llm(input_ids=ids[:, :5], use_cache=True))
    step = llm(input_ids=ids[:, 5:], **{name: cache}, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["past_key_values", "cache", "past_key_value"])
def test_cache_kwarg_and_output_cache_under_each_release_name(name):
    class Release(nn.Module):  # a forward that takes the cache under this release's name
        def forward(self, input_ids=None, **kwargs):
            return None
    Release.forward.__signature__ = inspect.Signature([
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)])
    assert cache_kwarg(Release()) == name
    if name != "past_key_value":
        marker = object()
        assert output_cache({name: marker}) is marker
        assert output_cache(ModelOutput(**{name: marker})) is marker
    assert output_cache(ModelOutput()) is None


def test_enable_checkpointing_hands_our_kwargs_to_torch_checkpoint():
    llm = tiny_llm()
    seen = []

    def context_fn():
        seen.append(1)
        return contextlib.nullcontext(), contextlib.nullcontext()

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the API this release prefers: no deprecation warning
        enable_checkpointing(llm, {"use_reentrant": False, "context_fn": context_fn})
    assert llm.model.layers[0].gradient_checkpointing
    llm.train()
    llm(input_ids=torch.randint(0, 64, (1, 4)), labels=torch.randint(0, 64, (1, 4))).loss.backward()
    assert len(seen) == 2  # once per checkpointed decoder layer
