"""MoME building blocks: router, experts and their backends, auxiliary losses (hand-computed values)."""
import math

import pytest
import torch

from mome.layers.experts import BACKENDS, MoMEExperts, experts_forward, resolve_backend
from mome.layers.layer import MoMELayer
from mome.metrics.load import coefficient_of_variation
from mome.layers.losses import (expert_load, load_balancing_loss, router_z_loss,
                                routing_stats)
from mome.layers.router import Router


def test_router_topk_and_renormalisation():
    r = Router(dim=4, num_experts=4, top_k=2, renormalize=True)
    with torch.no_grad():
        r.weight.copy_(torch.eye(4).unsqueeze(0))  # logits == x
    x = torch.tensor([[[1.0, 3.0, 2.0, 0.0]]])
    out = r(x)
    p = torch.softmax(x[0, 0], -1)
    assert out.topk_idx[0, 0].tolist() == [1, 2]
    assert torch.allclose(out.probs[0, 0], p)
    assert torch.allclose(out.topk_weight[0, 0], p[[1, 2]] / p[[1, 2]].sum())
    assert torch.allclose(out.topk_weight.sum(-1), torch.ones(1, 1))
    assert out.probs.dtype == torch.float32
    r.renormalize = False
    assert torch.allclose(r(x).topk_weight[0, 0], p[[1, 2]])


def test_per_scale_router_selects_by_row():
    r = Router(dim=8, num_experts=5, top_k=2, num_routers=3)
    x = torch.randn(3, 4, 8)
    ids = torch.tensor([2, 0, 1])
    out = r(x, ids)
    for row, s in enumerate(ids.tolist()):
        assert torch.allclose(out.logits[row], x[row] @ r.weight[s].t(), atol=1e-6)
    # a different assignment gives different logits for the same rows
    assert not torch.allclose(r(x, torch.tensor([0, 0, 0])).logits[0], out.logits[0])


def _random_experts(d=16, E=5, b=4, S=1, seed=0):
    torch.manual_seed(seed)
    ex = MoMEExperts(d, E, b, S)
    with torch.no_grad():  # fresh up-projections are zero; give them values so the test can fail
        ex.up.normal_(0, 0.3)
        ex.up_b.normal_(0, 0.3)
    return ex


def test_fresh_experts_add_exactly_zero():
    ex = MoMEExperts(16, 5, 4, 1)
    x = torch.randn(7, 16)
    idx = torch.randint(0, 5, (7, 2))
    for name in BACKENDS:
        assert torch.equal(experts_forward(ex, x, idx, torch.rand(7, 2), name), torch.zeros(7, 16))
    assert ex.down.abs().sum() > 0  # the other projection is not zero, so gradients reach the up-projection


@pytest.mark.parametrize("num_shared", [0, 1, 2])
@pytest.mark.parametrize("backend", ["dense", "grouped_mm"])
def test_backends_match_loop_outputs_and_grads(backend, num_shared):
    E, k, n, d = 6, 2, 40, 16
    ex = _random_experts(d=d, E=E, S=num_shared)
    torch.manual_seed(1)
    x = torch.randn(n, d)
    logits = torch.randn(n, E)
    logits[:, 5] = -1e4  # expert 5 gets no token: empty groups must work
    w, idx = torch.softmax(logits, -1).topk(k, -1)

    def run(name):
        ex.zero_grad()
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = experts_forward(ex, xx, idx, ww, name)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=torch.float32)).view_as(y))
        grads = {n_: p.grad.clone() for n_, p in ex.named_parameters()}
        return y.detach(), xx.grad, ww.grad, grads

    ref, out = run("loop"), run(backend)
    assert torch.allclose(out[0], ref[0], atol=1e-5), (out[0] - ref[0]).abs().max()
    assert torch.allclose(out[1], ref[1], atol=1e-5)
    assert torch.allclose(out[2], ref[2], atol=1e-5)
    for name in ref[3]:
        assert torch.allclose(out[3][name], ref[3][name], atol=1e-5), name


def test_loop_reference_matches_the_formula():
    ex = _random_experts(d=8, E=3, b=4, S=1)
    x = torch.randn(2, 8)
    idx = torch.tensor([[0, 2], [1, 0]])
    w = torch.tensor([[0.7, 0.3], [0.6, 0.4]])

    def expert(e, u):
        cols = slice(e * 4, (e + 1) * 4)
        return torch.nn.functional.gelu(u @ ex.down[:, cols] + ex.down_b[cols]) @ ex.up[cols] + ex.up_b[e]

    want = torch.stack([expert(3, x[t]) + sum(w[t, j] * expert(int(idx[t, j]), x[t]) for j in range(2))
                        for t in range(2)])
    assert torch.allclose(experts_forward(ex, x, idx, w, "loop"), want, atol=1e-6)


def test_backend_names():
    assert resolve_backend("auto", "cpu") in BACKENDS
    with pytest.raises(ValueError, match="unknown MoME expert backend"):
        resolve_backend("fast", "cpu")


def test_layer_shapes_dtype_and_views():
    layer = MoMELayer(16, num_experts=5, top_k=2, num_shared=1, bottleneck=4)
    assert layer.experts.routed_down().shape == (5, 16, 4)
    assert layer.experts.routed_up().shape == (5, 4, 16)
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    y, routing = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert routing.topk_idx.shape == (2, 3, 2) and routing.probs.shape == (2, 3, 5)


# ---- auxiliary losses -------------------------------------------------------------------------------------------

PROBS = torch.tensor([[0.4, 0.3, 0.2, 0.1],   # top-2: {0, 1}
                      [0.1, 0.2, 0.3, 0.4],   # {3, 2}
                      [0.5, 0.1, 0.3, 0.1]])  # {0, 2}


def _topk(p, k=2):
    return p.topk(k, -1).indices


def test_load_balancing_hand_computed():
    # f = [2, 1, 2, 1] / 3 (sums to k = 2), P = [1.0, 0.6, 0.8, 0.6] / 3, L = 4 * sum f P = 4 * 4.8 / 9
    probs = PROBS.unsqueeze(0)
    loss, tokens = load_balancing_loss(probs, _topk(probs), torch.tensor([0]), 1)
    assert torch.allclose(loss, torch.tensor([4 * 4.8 / 9]))
    assert tokens.tolist() == [3.0]
    loss_n, _ = load_balancing_loss(probs, _topk(probs), torch.tensor([0]), 1, topk_normalize=True)
    assert torch.allclose(loss_n, torch.tensor([4 * 4.8 / 9 / 2]))


def test_load_balancing_perfect_balance_gives_k():
    E, k = 4, 2
    probs = torch.full((1, 2, E), 1 / E)
    idx = torch.tensor([[[0, 1], [2, 3]]])
    loss, _ = load_balancing_loss(probs, idx, torch.tensor([0]), 1)
    assert torch.allclose(loss, torch.tensor([float(k)]))


def test_load_balancing_excludes_padding_and_splits_scales():
    pad = torch.tensor([[0.0, 0.0, 0.0, 1.0]])  # a padding token that would skew expert 3
    row0 = torch.cat([PROBS, pad]).unsqueeze(0)
    row1 = torch.full((1, 4, 4), 0.25)
    probs = torch.cat([row0, row1])
    idx = torch.cat([_topk(row0), torch.tensor([[[0, 1], [2, 3], [0, 1], [2, 3]]])])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    loss, tokens = load_balancing_loss(probs, idx, torch.tensor([1, 0]), 3, token_mask=mask)
    assert torch.allclose(loss, torch.tensor([2.0, 4 * 4.8 / 9, 0.0]))  # scale 2 has no tokens
    assert tokens.tolist() == [4.0, 3.0, 0.0]
    unmasked, _ = load_balancing_loss(probs, idx, torch.tensor([1, 0]), 3)
    assert not torch.allclose(unmasked[1], loss[1])


def test_z_loss_and_load_statistics():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    z, tokens = router_z_loss(logits, torch.tensor([0]), 1)
    want = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert torch.allclose(z, torch.tensor([want])) and tokens.tolist() == [2.0]
    probs = PROBS.unsqueeze(0)
    counts, _, tokens = routing_stats(probs, _topk(probs), torch.tensor([0]), 1)
    load = expert_load(counts, tokens, 2)
    assert torch.allclose(load, torch.tensor([[2, 1, 2, 1]]) / 6.0)
    assert torch.allclose(load.sum(-1), torch.ones(1))
    assert torch.allclose(coefficient_of_variation(load), torch.tensor([1 / 3]))


@pytest.mark.parametrize("router", [1, 3])
@pytest.mark.parametrize("backend", ["dense", "grouped_mm"])
def test_layer_backends_match_loop_including_router_grads(backend, router):
    """MoMELayer with the dense backend fuses the router into the down-projection: check it end to end."""
    torch.manual_seed(0)
    layer = MoMELayer(16, num_experts=6, top_k=2, num_shared=1, bottleneck=4, num_routers=router)
    with torch.no_grad():
        layer.experts.up.normal_(0, 0.3)
        layer.experts.up_b.normal_(0, 0.3)
    x = torch.randn(3, 5, 16)
    ids = torch.tensor([0, 2, 1]) if router > 1 else None

    def run(name):
        layer.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        y, routing = layer(xx, ids, backend=name)
        loss = (y * torch.cos(torch.arange(y.numel(), dtype=torch.float32)).view_as(y)).sum()
        (loss + routing.probs.pow(2).sum()).backward()
        return [y.detach(), xx.grad] + [p.grad for p in layer.parameters()]

    for a, b in zip(run("loop"), run(backend)):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_cached_weights_follow_in_place_updates():
    layer = MoMELayer(16, num_experts=4, top_k=2, num_shared=1, bottleneck=4)
    x = torch.randn(1, 3, 16)
    with torch.no_grad():
        first = layer(x, backend="dense")[0]
        layer.experts.up.add_(0.5)  # an optimiser step or load_state_dict changes weights in place
        layer.router.weight.mul_(-1.0)
        second, routing = layer(x, backend="dense")
        want, want_routing = layer(x, backend="loop")
    assert not torch.allclose(first, second)
    assert torch.allclose(second, want, atol=1e-5)
    assert torch.equal(routing.topk_idx, want_routing.topk_idx)


def test_parameter_storage_matches_per_expert_count():
    """(E+S) experts of 2db+b+d parameters each plus the router: the basis of the paper's 12,732,048."""
    d, E, S, b, k = 3072, 23, 1, 12, 4
    layer = MoMELayer(d, num_experts=E, top_k=k, num_shared=S, bottleneck=b)
    per_expert = 2 * d * b + b + d
    assert sum(p.numel() for p in layer.parameters()) == (E + S) * per_expert + E * d
    assert 28 * ((k + S) * per_expert + E * d) == 12_732_048


def test_every_expert_backend_the_schema_offers_exists():
    from mome.config import EXPERT_BACKENDS

    assert set(BACKENDS) | {"auto"} == set(EXPERT_BACKENDS)
