"""benchmarks/run.py end to end on tiny shapes, so the benchmark code cannot rot: every section runs on the tiny
random backbones (the Whisper section on the real whisper-tiny.en judge and a tiny synthetic corpus), the report
names every target, and the JSON file holds the machine and the numbers."""
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import run  # noqa: E402
from benchmarks.common import paired_ratio, time_interleaved  # noqa: E402
from tests.data_fixtures import TINY, tiny_corpus  # noqa: E402


def test_time_interleaved_rotates_and_drops_warmup():
    calls = []
    res = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b") or 2.5}, repeats=2,
                           warmup=1)
    assert calls == ["a", "b", "b", "a", "a", "b"]  # order rotated every round
    assert res["a"]["n"] == res["b"]["n"] == 2
    assert res["b"]["median_ms"] == 2.5  # a case may report its own time
    assert paired_ratio([2.0, 9.0, 4.0], [1.0, 3.0, 4.0]) == 2.0  # median of per-round ratios, not of medians


def test_run_all_tiny(tmp_path, capsys):
    overrides = [f"data.synth.{k}={v}" for k, v in TINY.items()]
    plan = run.tiny_plan(tmp_path / "backbones", corpus_root=str(tiny_corpus()), synth_num=TINY["num"],
                         data_overrides=overrides)
    out = tmp_path / "results.json"
    res = run.run_all("tiny", plan, out=out, verbose=True)

    errors = {n: s["traceback"] for n, s in res["sections"].items() if "error" in s}
    assert not errors, errors
    saved = json.loads(out.read_text())
    assert saved["machine"]["torch_threads"] >= 1 and saved["machine"]["cpu"]
    assert set(saved["sections"]) == set(run.SECTIONS)

    llm = saved["sections"]["llm"]["runs"][0]
    assert llm["prefill_ratio"]["frozen"] == 1.0
    frac = llm["mome_flops_fraction"]
    assert llm["profile"]["mome_added"] and 0 < frac["active"] < frac["dense"]
    assert all(llm["prefill"][v]["median_ms"] > 0 for v in ("frozen", "mome", "lora"))
    step = saved["sections"]["step"]
    assert math.isclose(step["sum_singles_ms"], sum(step["times"][f"single {s}"]["median_ms"] for s in step["scales"]))
    assert 0 < step["padding"]["real_fraction"] <= step["padding"]["packed_real_fraction"] <= 1
    el = saved["sections"]["elastic"]
    assert el["rows"]["avsr:4x2"]["tokens"] > el["rows"]["avsr:16x5"]["tokens"]
    wh = saved["sections"]["whisper"]
    assert {"30s", "crop+tail"} <= set(wh["wer"]) and wh["speed"]["speedup"] > 1
    mem = saved["sections"]["memory"]["rows"]
    assert mem and "error" not in mem[0] and mem[0]["delta_mib"] >= 0

    what = [t["what"] for t in saved["targets"]]
    for key in ("MoE layer", "prefill(LLM+MoME)", "matryoshka step", "token ratio", "crop"):
        assert any(key in w for w in what), (key, what)
    printed = capsys.readouterr().out
    assert "-- targets" in printed and ("MET" in printed or "MISS" in printed)


def test_packed_rows_give_the_padded_loss(tmp_path):
    """The packing prototype of the Matryoshka-step benchmark: same token-mean CE as the padded one-call forward."""
    import torch

    from benchmarks.matryoshka_step import build, make_batch, pack_rows, packed_loss

    assert pack_rows([10, 7, 3, 5, 9, 2], 2) == [[0, 3, 2], [4, 1, 5]]
    plan = run.tiny_plan(tmp_path / "backbones")
    cfg, model = build(plan["step"]["spec"], tmp_path)
    model.eval()
    with torch.no_grad():
        for m in model.mome:
            m.experts.up.normal_(0, 0.02)
        batch = make_batch([9, 6])
        out = model(batch, model.scales)
        ref = sum(out.ce[s.name] * out.num_tokens[s.name] for s in model.scales) / sum(out.num_tokens.values())
        assert torch.allclose(packed_loss(model, batch, model.scales), ref, atol=1e-5)
