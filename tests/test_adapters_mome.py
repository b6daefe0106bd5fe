"""MoME wrappers inside tiny random Llama / Qwen2 models: exactness, placements, scale ids, masks, KV cache,
checkpointing."""
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from mome.config import MoMEConfig
from mome.adapters.hf_compat import enable_checkpointing
from mome.adapters import MoMEAttention, MoMEDecoderLayer, MoMEMLP, attach_mome_from_config

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def tiny_llm(kind="llama", seed=0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**TINY))
    model.requires_grad_(False)
    model.generation_config.eos_token_id = None  # decode a fixed number of tokens
    return model.eval()


def mome_cfg(**kw):
    base = dict(num_experts=6, top_k=2, num_shared=1, bottleneck=4)
    base.update(kw)
    return MoMEConfig(**base)


def inject_mome(llm, cfg, num_scales=1):
    return attach_mome_from_config(llm, cfg, num_scales)


def randomise(handle, seed=1, std=0.2):
    """Fresh MoME adds zero; give the up-projections values so that MoME changes the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in handle.modules:
            m.experts.up.copy_(torch.randn(m.experts.up.shape, generator=g) * std)
            m.experts.up_b.copy_(torch.randn(m.experts.up_b.shape, generator=g) * std)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("placement", ["mhsa", "ffn", "layer"])
def test_zero_init_equals_frozen_llm_exactly(kind, placement):
    llm = tiny_llm(kind)
    ids = torch.randint(0, 128, (2, 9))
    frozen = {n: p.clone() for n, p in llm.named_parameters()}
    ref = llm(ids).logits
    handle = inject_mome(llm, mome_cfg(placement=placement), num_scales=2)
    wrapper = {"mhsa": MoMEAttention, "ffn": MoMEMLP, "layer": MoMEDecoderLayer}[placement]
    assert sum(isinstance(m, wrapper) for m in llm.modules()) == 2  # one per decoder layer, at the placement
    with handle.call(torch.tensor([0, 1]), token_mask=torch.ones(2, 9, dtype=torch.bool)):
        out = llm(ids).logits
    assert torch.equal(out, ref)
    randomise(handle)
    with handle.call(batch_size=2):
        assert not torch.allclose(llm(ids).logits, ref, atol=1e-3)  # the MoME modules are really in the path
    unwrapped = {_frozen_name(n): p for n, p in llm.named_parameters()}
    assert all(torch.equal(p, frozen[n]) for n, p in unwrapped.items())  # frozen weights untouched
    assert set(unwrapped) == set(frozen)  # no MoME parameter registered inside the LLM
    handle.remove()
    assert torch.equal(llm(ids).logits, ref)
    assert set(n for n, _ in llm.named_parameters()) == set(frozen)


@pytest.mark.parametrize("placement", ["mhsa", "ffn", "layer"])
def test_placement_changes_only_its_sublayer(placement):
    llm = tiny_llm("llama")
    layer0 = llm.model.layers[0]
    raw, final = {}, {}

    def capture(store, name):
        def hook(module, args, kwargs, output):
            x = kwargs.get("hidden_states", args[0] if args else None)
            store[name] = (x.detach().clone(), (output[0] if isinstance(output, tuple) else output).detach().clone())
        return hook

    subs = {"attn": layer0.self_attn, "mlp": layer0.mlp, "layer": layer0}
    for name, mod in subs.items():  # registered before the MoME hooks: see the frozen sublayer's own output
        mod.register_forward_hook(capture(raw, name), with_kwargs=True)
    handle = inject_mome(llm, mome_cfg(placement=placement), num_scales=1)
    randomise(handle)
    wrapped = {"attn": layer0.self_attn, "mlp": layer0.mlp, "layer": llm.model.layers[0]}
    for name, mod in wrapped.items():  # on the wrappers: see the output the model goes on with
        mod.register_forward_hook(capture(final, name), with_kwargs=True)
    with handle.call(batch_size=2):
        llm(torch.randint(0, 128, (2, 7)))
    target = {"mhsa": "attn", "ffn": "mlp", "layer": "layer"}[placement]
    for name in ("attn", "mlp"):
        x, out = final[name]
        if name == target:
            want = raw[name][1] + handle.modules[0](x)[0]
            assert torch.allclose(out, want, atol=1e-6)
            assert not torch.allclose(out, raw[name][1], atol=1e-4)
        else:
            assert torch.equal(out, raw[name][1])
    if placement == "layer":
        x, out = final["layer"]
        assert torch.allclose(out, raw["layer"][1] + handle.modules[0](x)[0], atol=1e-6)


def _greedy_no_cache(llm, ids, steps):
    for _ in range(steps):
        nxt = llm(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("placement", ["mhsa", "layer"])
def test_generate_with_kv_cache_equals_no_cache_greedy(kind, placement):
    llm = tiny_llm(kind)
    handle = inject_mome(llm, mome_cfg(placement=placement, router="per_scale"), num_scales=2)
    randomise(handle, std=0.5)
    ids = torch.randint(0, 128, (2, 6))
    sid, mask = torch.tensor([1, 0]), torch.ones(2, 6, dtype=torch.bool)
    with handle.call(sid):
        want = _greedy_no_cache(llm, ids, 6)
    with handle.call(sid, token_mask=mask):
        got = llm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                           use_cache=True, pad_token_id=0)
    assert torch.equal(got, want)
    with handle.call(1 - sid):
        assert not torch.equal(want, _greedy_no_cache(llm, ids, 6))  # scale ids matter


def test_beam_search_expands_scale_ids_per_row():
    llm = tiny_llm("llama")
    handle = inject_mome(llm, mome_cfg(router="per_scale"), num_scales=2)
    randomise(handle, std=0.5)
    ids = torch.randint(0, 128, (2, 5))
    kw = dict(max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    sid = torch.tensor([1, 0])
    with handle.call(sid):
        batched = llm.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    for row in range(2):
        with handle.call(sid[row:row + 1]):
            single = llm.generate(ids[row:row + 1], attention_mask=torch.ones_like(ids[row:row + 1]), **kw)
        assert torch.equal(batched[row], single[0])


def test_padding_tokens_do_not_enter_the_load_balancing_loss():
    llm = tiny_llm("llama")
    handle = inject_mome(llm, mome_cfg(), num_scales=1)
    randomise(handle)
    handle.modules.train()
    ids = torch.randint(1, 128, (1, 5))
    with handle.call(batch_size=1) as call:
        llm(ids)
    alone = handle.aux_losses(call)
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    real = torch.tensor([[True] * 5 + [False] * 3])
    with handle.call(batch_size=1, token_mask=real) as call:
        llm(padded, attention_mask=real.long())
    masked = handle.aux_losses(call)
    assert torch.allclose(masked["lb"], alone["lb"], atol=1e-6)
    assert torch.allclose(masked["expert_load"], alone["expert_load"], atol=1e-6)
    with handle.call(batch_size=1) as call:
        llm(padded, attention_mask=real.long())
    assert not torch.allclose(handle.aux_losses(call)["lb"], alone["lb"], atol=1e-4)


def test_aux_collection_per_layer_and_eval_mode():
    llm = tiny_llm("llama")
    handle = inject_mome(llm, mome_cfg(z_coef=1e-3), num_scales=3)
    ids = torch.randint(0, 128, (3, 4))
    handle.modules.eval()
    with handle.call(torch.tensor([0, 2, 2])) as call:
        llm(ids)
    empty = handle.aux_losses(call)  # modules in eval mode: nothing collected
    assert empty["layer_calls"] == 0 and float(empty["lb"]) == 0.0
    handle.modules.train()
    with handle.call(torch.tensor([0, 2, 2])) as call:
        llm(ids)
    aux = handle.aux_losses(call)
    assert aux["layer_calls"] == 2 and aux["expert_load"].shape == (2, 6)
    assert torch.allclose(aux["expert_load"].sum(-1), torch.ones(2))
    assert aux["lb"].requires_grad and float(aux["z"].detach()) > 0
    with handle.call(torch.tensor([0, 2, 2])) as call:
        pass
    assert handle.aux_losses(call)["layer_calls"] == 0  # statistics belong to their call


def test_record_routing_is_off_by_default_and_records_generation():
    llm = tiny_llm("llama")
    handle = inject_mome(llm, mome_cfg(), num_scales=1)
    ids = torch.randint(0, 128, (2, 5))
    with handle.call(batch_size=2) as call:
        llm(ids)
    assert call.trace is None
    with handle.call(batch_size=2, trace=True) as call:
        llm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    trace = call.trace
    assert handle.slot.current is None  # nothing stays bound after the call
    assert trace.num_calls == 3 and len(trace.layers) == 2
    first, step = trace.layers[1][0], trace.layers[1][1]
    assert first.topk_idx.shape == (2, 5, 2) and first.probs.shape == (2, 5, 6) and first.gates.shape == (2, 5, 2)
    assert step.topk_idx.shape == (2, 1, 2) and step.token_mask.all()
    assert torch.allclose(first.gates.sum(-1), torch.ones(2, 5))


def test_bad_calls_give_clear_errors():
    llm = tiny_llm("llama")
    handle = inject_mome(llm, mome_cfg(), num_scales=2)
    ids = torch.randint(0, 128, (2, 5))
    with pytest.raises(RuntimeError, match="outside an adapter call"):
        llm(ids)
    with pytest.raises(ValueError, match="scale_ids have 3 rows but the input has 2"):
        with handle.call(torch.tensor([0, 1, 1])):
            llm(ids)
    with pytest.raises(ValueError, match="out of range"):
        with handle.call(torch.tensor([0, 2])):
            llm(ids)
    with pytest.raises(ValueError, match="token_mask has 4 positions"):
        with handle.call(torch.tensor([0, 1]), token_mask=torch.ones(2, 4, dtype=torch.bool)):
            llm(ids)
    with pytest.raises(ValueError, match="token_mask must be a BoolTensor"):
        with handle.call(torch.tensor([0, 1]), token_mask=torch.ones(3, 5, dtype=torch.bool)):
            pass
    with pytest.raises(RuntimeError, match="already has MoME"):
        inject_mome(llm, mome_cfg(), num_scales=2)


@pytest.mark.parametrize("placement", ["mhsa", "ffn", "layer"])
def test_gradient_checkpointing_gives_the_same_gradients(placement):
    """Two forwards with different scale ids, then one backward: per-scale routers must get the right gradients."""
    ids = torch.randint(0, 128, (2, 6))

    def grads(checkpointing):
        llm = tiny_llm("llama")
        handle = inject_mome(llm, mome_cfg(placement=placement, router="per_scale", z_coef=1e-2), num_scales=2)
        randomise(handle)
        llm.train()
        handle.modules.train()
        if checkpointing:
            enable_checkpointing(llm, handle.checkpoint_kwargs())
            assert llm.model.layers[0].gradient_checkpointing
        emb = llm.get_input_embeddings()(ids).requires_grad_()  # gradient must also reach the inputs
        loss, calls = 0, []
        for s in (0, 1):
            with handle.call(torch.full((2,), s)) as call:
                loss = loss + llm(inputs_embeds=emb, labels=ids).loss
            calls.append(call)
        aux = [handle.aux_losses(c) for c in calls]
        recorded = [len(c.aux) for c in calls]
        (loss + sum(0.1 * a["lb"] + a["z"] for a in aux)).backward()
        assert [len(c.aux) for c in calls] == recorded == [2, 2]  # recomputation records nothing
        assert handle.slot.current is None
        out = {n: p.grad.clone() for n, p in handle.modules.named_parameters()}
        out["inputs_embeds"] = emb.grad.clone()
        return out

    plain, ckpt = grads(False), grads(True)
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6), (name, (plain[name] - ckpt[name]).abs().max())
    for layer in range(2):  # both per-scale routers got gradient
        g = plain[f"{layer}.router.weight"]
        assert g[0].abs().sum() > 0 and g[1].abs().sum() > 0


def test_generate_from_inputs_embeds_with_left_padding_and_beams():
    """The AVSR model's path: inputs_embeds, a left-padded batch, the token mask of the prompt, beam search."""
    llm = tiny_llm("qwen2")
    handle = inject_mome(llm, mome_cfg(router="per_scale"), num_scales=2)
    randomise(handle, std=0.5)
    ids = torch.randint(1, 128, (2, 6))
    am = torch.ones(2, 6, dtype=torch.long)
    am[1, :2] = 0  # row 1 is left-padded
    kw = dict(attention_mask=am, max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)
    with handle.call(torch.tensor([0, 1]), token_mask=am.bool()):
        from_ids = llm.generate(ids, **kw)[:, 6:]
    with handle.call(torch.tensor([0, 1]), token_mask=am.bool(), trace=True) as call:
        from_embeds = llm.generate(inputs_embeds=llm.get_input_embeddings()(ids), **kw)
    assert torch.equal(from_embeds, from_ids)
    first = call.trace.layers[0][0]
    assert first.token_mask.shape == (4, 6)  # 2 rows x 2 beams
    assert first.scale_ids.tolist() == [0, 0, 1, 1] and not first.token_mask[2:, :2].any()



def _frozen_name(name: str) -> str:
    """A parameter name inside the LLM without the wrapper's hop (``self_attn.attention.q_proj`` -> ``self_attn.q_proj``)."""
    return re.sub(r"(self_attn\.)attention\.|(mlp\.)mlp\.|(layers\.\d+\.)layer\.",
                  lambda m: next(g for g in m.groups() if g), name)
