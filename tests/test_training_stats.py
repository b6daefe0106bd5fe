"""Named metrics (``mome.training.stats``): the one-all_reduce helper, the training micro-batch sums and their interval
means, and the validation batch sums. Processes are faked: a fake accelerator's ``reduce`` adds the buffers the other
processes sent."""
from types import SimpleNamespace

import pytest
import torch

from mome.training.stats import Accumulator, StepStats, Sums, flatten, reduce_sum, skipped, unflatten
from mome.training.validation import batch_sums

SCALES = ["a", "b", "c"]


class FakeAccelerator:
    """One process of a fake group: ``reduce(t, "sum")`` returns ``t`` plus the buffers of the other processes."""

    device = torch.device("cpu")

    def __init__(self, others=()):
        self.others = list(others)
        self.sent = []  # the buffers this process passed to reduce, one per all_reduce

    def reduce(self, tensor, reduction="mean"):
        assert reduction == "sum"
        self.sent.append(tensor.clone())
        return tensor + sum(self.others, torch.zeros_like(tensor))


def flatten_sums(s: Sums) -> torch.Tensor:
    """The buffer a process sends for ``s`` (what the other fake processes add)."""
    acc = FakeAccelerator()
    s.reduce(acc)
    return acc.sent[0]


def test_flatten_unflatten_round_trip_of_several_shapes():
    tensors = {"scalar": torch.tensor(2.5), "vector": torch.arange(4, dtype=torch.float32),
               "matrix": torch.randn(2, 3, dtype=torch.float64), "empty": torch.zeros(0), "b_int": torch.tensor([7, 8])}
    flat = flatten(tensors)
    assert flat.dtype == torch.float64 and flat.shape == (1 + 4 + 6 + 0 + 2,)
    back = unflatten(flat, tensors)
    assert list(back) == sorted(tensors)  # a fixed key order, whatever the insertion order
    for k, t in tensors.items():
        assert back[k].shape == t.shape and back[k].dtype == torch.float64 and torch.equal(back[k], t.double())
    assert torch.equal(flatten(dict(reversed(list(tensors.items())))), flat)
    with pytest.raises(ValueError):
        unflatten(torch.zeros(flat.numel() + 1, dtype=torch.float64), tensors)
    assert flatten({}).shape == (0,)


def test_reduce_sum_adds_two_processes_tensors_in_one_all_reduce():
    mine = {"x": torch.tensor(1.0), "load": torch.ones(2, 3), "ce": torch.tensor([1.0, 2.0, 3.0])}
    theirs = {"x": torch.tensor(10.0), "load": torch.full((2, 3), 2.0), "ce": torch.tensor([0.5, 0.0, 1.0])}
    acc = FakeAccelerator([flatten(theirs)])
    out = reduce_sum(acc, mine)
    assert len(acc.sent) == 1
    assert set(out) == set(mine)
    for k in mine:
        assert torch.equal(out[k], (mine[k] + theirs[k]).double())


def test_sums_reduce_gives_the_global_means():
    p0, p1 = Sums(SCALES), Sums(SCALES)
    p0.add("loss", 2.0, 3)
    p0.add_per_scale("ce", {"a": 1.0, "b": 4.0}, 3)
    p0.add("load", torch.tensor([[0.5, 0.5]]), 3)
    p1.add("loss", torch.tensor(4.0), 1)
    p1.add_per_scale("ce", {"a": 5.0}, 1)  # this process computed no CE for scales b and c
    p1.add("load", torch.tensor([[1.0, 0.0]]), 1)
    acc = FakeAccelerator([flatten_sums(p1)])
    r = p0.reduce(acc)
    assert len(acc.sent) == 1  # sums and weights of every key in one all_reduce
    assert r.mean("loss") == pytest.approx((2 * 3 + 4 * 1) / 4)
    assert r.per_scale("ce") == pytest.approx({"a": (3 * 1 + 5) / 4, "b": 4.0})  # c: weight 0, left out
    assert torch.allclose(r.mean("load"), torch.tensor([[0.625, 0.375]], dtype=torch.float64))
    assert r.total("loss") == 10.0 and p0.total("loss") == 6.0  # the local sums stay as they were
    with pytest.raises(ValueError):
        p0.add("load", torch.zeros(3), 1)


def test_real_accelerator_single_process(fresh_accelerate):
    from accelerate import Accelerator

    s = Sums(SCALES)
    s.add("loss", 1.5, 2)
    s.add_per_scale("ce", {"c": 3.0}, 2)
    r = s.reduce(Accelerator(cpu=True))
    assert r.mean("loss") == 1.5 and r.per_scale("ce") == {"c": 3.0}


def _output(loss, ce, lb=0.1, z=0.01, load=None):
    return SimpleNamespace(loss=torch.tensor(loss), ce={k: torch.tensor(v) for k, v in ce.items()},
                           aux={"lb": torch.tensor(lb), "z": torch.tensor(z)},
                           expert_load=torch.tensor(load) if load is not None else None)


def test_every_micro_batch_has_the_same_layout_and_skipped_ones_carry_no_numbers():
    stats = StepStats(SCALES, (2, 2))
    good = stats.record(_output(1.0, {"a": 1.0}, load=[[0.5, 0.5], [1.0, 0.0]]), bad=False, empty=False,
                        stop=False, n=4)
    bad = stats.record(_output(float("nan"), {"a": float("nan")}), bad=True, empty=False, stop=True, n=2)
    empty = stats.record(None, bad=False, empty=True, stop=False, n=0)
    layout = {k: v.shape for k, v in good.sum.items()}
    assert layout == {"bad": (), "empty": (), "stop": (), "n": (), "loss": (), "lb": (), "z": (), "ce": (3,),
                      "expert_load": (2, 2)}
    for s in (bad, empty):
        assert {k: v.shape for k, v in s.sum.items()} == layout
        assert all(torch.isfinite(v).all() for v in s.sum.values())
        assert all(float(s.weight[k].sum()) == 0 for k in layout if k not in ("bad", "empty", "stop", "n"))
    assert bad.total("n") == 2 and bad.total("stop") == 1
    with pytest.raises(ValueError):
        stats.record(_output(1.0, {}, load=[[1.0, 0.0, 0.0]]), bad=False, empty=False, stop=False, n=1)


def test_interval_means_are_exact_global_sample_weighted_means_without_skipped_micro_batches():
    stats = StepStats(SCALES, (1, 2))
    # micro-batch 1: two processes, 3 and 1 samples; micro-batch 2: process 1 has a NaN (skipped everywhere)
    m1 = [stats.record(_output(2.0, {"a": 1.0, "b": 3.0}, lb=0.2, load=[[1.0, 0.0]]), False, False, False, 3),
          stats.record(_output(6.0, {"a": 5.0}, lb=0.6, load=[[0.0, 1.0]]), False, False, False, 1)]
    m2 = [stats.record(_output(1.0, {"a": 1.0}), False, False, False, 2),
          stats.record(_output(float("nan"), {}), True, False, False, 2)]
    interval = Accumulator()
    for pair in (m1, m2):
        r0 = pair[0].reduce(FakeAccelerator([flatten_sums(pair[1])]))
        r1 = pair[1].reduce(FakeAccelerator([flatten_sums(pair[0])]))
        assert {k: v.tolist() for k, v in r0.sum.items()} == {k: v.tolist() for k, v in r1.sum.items()}
        interval.add(r0)
    assert not skipped(m1[0].reduce(FakeAccelerator([flatten_sums(m1[1])])))
    assert skipped(m2[0].reduce(FakeAccelerator([flatten_sums(m2[1])])))
    rec = interval.summary()
    assert rec["loss"] == pytest.approx((2 * 3 + 6) / 4) and rec["lb"] == pytest.approx((0.2 * 3 + 0.6) / 4)
    assert rec["z"] == pytest.approx(0.01)
    assert rec["ce"] == pytest.approx({"a": (3 + 5) / 4, "b": 3.0})
    assert rec["expert_cv"] == [pytest.approx(0.5)]  # load [0.75, 0.25]: std 0.25 / mean 0.5
    assert rec["samples_per_s"] > 0 and interval.sums.total("n") == 4
    interval.reset()
    assert set(interval.summary()) == {"samples_per_s"}


def test_validation_batch_sums_share_one_layout_and_give_the_reading_gap():
    none = batch_sums(SCALES)
    own = _output(2.0, {"a": 1.0, "b": 2.0})
    rolled = _output(3.0, {"a": 1.5, "b": 2.25})
    with_rolled = batch_sums(SCALES, own, rolled, 4.0)
    alone = batch_sums(SCALES, _output(1.0, {"a": 3.0, "b": 3.0}), None, 1.0)  # a one-utterance batch
    for s in (with_rolled, alone):
        assert {k: v.shape for k, v in s.sum.items()} == {k: v.shape for k, v in none.sum.items()}
    total = batch_sums(SCALES)
    total += with_rolled
    total += alone
    assert total.mean("loss") == pytest.approx((2 * 4 + 1) / 5)
    assert total.per_scale("ce") == pytest.approx({"a": (4 + 3) / 5, "b": (8 + 3) / 5})
    assert total.per_scale("ce_rolled") == pytest.approx({"a": 1.5, "b": 2.25})  # only the batch that rolled
    assert total.per_scale("reading_gap") == pytest.approx({"a": 0.5, "b": 0.25})
