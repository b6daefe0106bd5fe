"""Every name mome.models.hf_compat knows for a transformers / torch internal, exercised one by one."""
import inspect

import pytest
import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import ModelOutput

from mome.models.hf_compat import (CACHE_KWARGS, allow_generate_kwargs, cache_kwarg, cached_length,
                                   disallow_generate_kwargs, in_backward, output_cache)

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def tiny_llm():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("name", CACHE_KWARGS)
def test_cached_length_reads_every_cache_kwarg_name(name):
    llm = tiny_llm()
    cache = output_cache(llm(input_ids=torch.randint(0, 64, (1, 5)), use_cache=True))
    assert isinstance(cache, DynamicCache)
    assert cached_length({name: cache}, 1) == 5
    assert cached_length({"unrelated": cache}, 1) is None


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


def test_generate_accepts_allowed_kwargs_on_this_instance_only():
    llm, other = tiny_llm(), tiny_llm()
    seen = []
    llm.model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, a, kw: (seen.append(kw.pop("mome_probe", None)), (a, kw))[1], with_kwargs=True)
    ids = torch.randint(0, 64, (1, 4))
    with pytest.raises(ValueError, match="mome_probe"):
        llm.generate(input_ids=ids, max_new_tokens=2, do_sample=False, mome_probe=torch.ones(1))
    allow_generate_kwargs(llm, ["mome_probe"])
    llm.generate(input_ids=ids, max_new_tokens=2, do_sample=False, mome_probe=torch.ones(1))
    assert len(seen) == 2 and all(s is not None for s in seen)  # prefill and one decoding step received it
    with pytest.raises(ValueError, match="mome_probe"):  # another instance of the same class is untouched
        other.generate(input_ids=ids, max_new_tokens=2, do_sample=False, mome_probe=torch.ones(1))
    disallow_generate_kwargs(llm, ["mome_probe"])
    with pytest.raises(ValueError, match="mome_probe"):
        llm.generate(input_ids=ids, max_new_tokens=2, do_sample=False, mome_probe=torch.ones(1))


def test_in_backward_is_true_only_inside_a_backward_pass():
    flags = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            flags.append(("forward", in_backward()))
            return x * 2

        @staticmethod
        def backward(ctx, g):
            flags.append(("backward", in_backward()))
            return g * 2

    x = torch.ones(3, requires_grad=True)
    Probe.apply(x).sum().backward()
    assert flags == [("forward", False), ("backward", True)]
    assert not in_backward()
